"""Kronecker-structured orthogonal rotations, applied without forming the matrix: the floor of QuIP (quip.py)
and of the rotated layers QuantLinear stores (linear.py).

Implements: x @ (F₀ ⊗ F₁ ⊗ …) for x (..., n) with n = Π dim(Fᵢ), contracting one factor at a time in
O(n · Σ dim Fᵢ) per row instead of O(n²); and normalised Hadamard factors of order n = 12^m · 2^k
(Sylvester's doubling for 2^k, Paley's construction I with q = 11 for 12), whose Kronecker product is an
orthogonal Hadamard matrix H/√n.
Glossary: F factors · H Hadamard matrix (entries ±1, H Hᵀ = n I) · χ the quadratic character mod 11.
Left out: fast Walsh–Hadamard transforms (the factors are multiplied as dense matrices) and other orders.
"""

from __future__ import annotations

import math

import torch


def kron_right(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """x @ (F_0 ⊗ F_1 ⊗ …) for x (..., n) with n = Π dim(F_i), without forming the Kronecker product."""
    lead, n = x.shape[:-1], x.shape[-1]
    y = x.reshape(-1, *[f.shape[0] for f in factors])  # (N, p_0, p_1, ...)
    for axis, f in enumerate(factors, start=1):  # contract axis k with F_k's rows: y[..., k, ...] @ F_k
        y = torch.tensordot(y, f.to(device=y.device, dtype=y.dtype), dims=([axis], [0])).movedim(-1, axis)
    return y.reshape(*lead, n)


def _paley12() -> torch.Tensor:
    """A Hadamard matrix of order 12 (Paley I, q = 11): I + S with S the skew conference matrix."""
    residues = {(x * x) % 11 for x in range(1, 11)}
    chi = [0] + [1 if a in residues else -1 for a in range(1, 11)]  # quadratic character mod 11
    s = torch.zeros(12, 12)
    s[0, 1:], s[1:, 0] = 1.0, -1.0
    for i in range(11):
        for j in range(11):
            s[1 + i, 1 + j] = chi[(j - i) % 11]
    return torch.eye(12) + s


def hadamard_factors(n: int) -> list[torch.Tensor]:
    """Orthonormal Hadamard factors whose Kronecker product has order n = 12^m · 2^k."""
    factors, rest = [], n
    while rest % 12 == 0:
        factors.append(_paley12())
        rest //= 12
    if rest & (rest - 1):
        raise ValueError(f"no Hadamard rotation of order {n} here (need 12^m · 2^k); use rotation='orthogonal'")
    if rest > 1:
        h = torch.ones(1, 1)
        while h.shape[0] < rest:  # Sylvester: H_2k = [[H, H], [H, -H]]
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        factors.append(h)
    return [f / math.sqrt(f.shape[0]) for f in factors]


def unrotate_weight(w: torch.Tensor, rot_in: tuple[list[torch.Tensor], torch.Tensor] | None,
                    rot_out: tuple[list[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """Uᵀ W̃ V for a rotated weight W̃ (R, C), with V = (⊗F)·diag(signs) from ``rot_in`` and U from ``rot_out``
    (either may be None): the weight a rotated layer really computes with (QuIP's inverse of U W Vᵀ)."""
    if rot_in is not None:
        w = kron_right(w, rot_in[0]) * rot_in[1].to(w)  # W̃ V
    if rot_out is not None:
        w = (kron_right(w.T, rot_out[0]) * rot_out[1].to(w)).T  # Uᵀ W̃ V
    return w
