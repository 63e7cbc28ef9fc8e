"""Damped Hessians and the Cholesky factor of their inverse: the linear algebra GPTQ and SparseGPT share.

Papers: GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, 2023, arXiv:2210.17323) §3 "Step 3: Cholesky
reformulation"; SparseGPT (Frantar & Alistarh, 2023, arXiv:2301.00774) §3.2.
Implements: H ← H + λ · mean(diag H) · I (λ = 1 % by default), with inputs that were always zero (H_jj = 0)
given H_jj = 1 so H stays invertible; and U = the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), whose row j
holds what optimal-brain-surgeon updates need once columns < j are fixed.
Glossary: H = XᵀX / n calibration Hessian (C × C) · λ damp · U upper Cholesky factor of H⁻¹.
Left out: adaptive re-damping when the factorisation fails (we raise and name the fix instead).
"""

from __future__ import annotations

import torch


def damped_hessian(hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(H + λ·mean(diag H)·I in float64, dead) where ``dead`` marks inputs that were always zero.

    A dead input (H_jj = 0) gets H_jj = 1 so H stays invertible; its weights multiply only zeros, so
    callers may set them to zero for free (GPTQ and SparseGPT do).
    """
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be a square (C, C) matrix, got shape {tuple(hessian.shape)}")
    if not 0 <= damp < 1:
        raise ValueError(f"damp={damp} must be in [0, 1) (a fraction of the mean diagonal, e.g. 0.01)")
    H = hessian.double().clone()  # (C, C)
    dead = torch.diagonal(H) == 0  # (C,)
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * torch.diagonal(H).mean())  # GPTQ §3 "Step 3": λ = 1% of the mean diagonal
    return H, dead


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U is the upper Cholesky factor of (damped H)⁻¹ = UᵀU, float64; see ``damped_hessian``.

    Row j of U holds the OBS quantities after columns < j are fixed: U_jj² = [H_{j:, j:}⁻¹]_00 and
    U_{j, j:} / U_jj is the update that removing weight j sends to columns ≥ j (GPTQ Eq. 3, SparseGPT §3.2).
    """
    H, dead = damped_hessian(hessian, damp)
    L, info = torch.linalg.cholesky_ex(H)  # H = L Lᵀ
    if info:
        raise ValueError(f"the damped Hessian is not positive definite (damp={damp}); use a larger damp such "
                         "as 0.1 or more calibration tokens")
    H_inv = torch.cholesky_inverse(L)  # (C, C) H⁻¹
    return torch.linalg.cholesky(H_inv, upper=True), dead  # (C, C) upper U
