"""S4 and DSS: a linear state-space layer run as one long convolution, its kernel computed from (A, B, C, Δ).

Papers: Gu, Goel, Ré (2022), "Efficiently Modeling Long Sequences with Structured State Spaces", ICLR 2022,
arXiv:2111.00396 — §2 (the SSM, its bilinear discretisation and the convolution kernel K̄), §3 (A diagonal plus low
rank, the kernel through its truncated generating function at the roots of unity, the Woodbury identity and a
Cauchy kernel: Algorithm 1), HiPPO-LegS; Gupta, Gu, Berant (2022), "Diagonal State Spaces are as Effective as
Structured State Spaces", NeurIPS 2022, arXiv:2203.14343 — §3 (DSS: a diagonal A, zero-order hold).
Implements, for one input channel u (length L) and a state of size N:
  bilinear (S4)   Ā = (I − Δ/2 A)⁻¹ (I + Δ/2 A),  B̄ = (I − Δ/2 A)⁻¹ Δ B
  ZOH (DSS)       Ā = exp(ΔΛ),  B̄ = Λ⁻¹ (exp(ΔΛ) − I) B          (Λ diagonal)
  recurrent form  x_k = Ā x_{k−1} + B̄ u_k,  y_k = Re(C x_k)
  convolution     y = Re(K̄) ∗ u,  K̄ = (C B̄, C Ā B̄, …, C Ā^{L−1} B̄)
  S4's kernel     with A = Λ − P Q* (diagonal plus low rank) and z = e^{−2πij/L}, j < L (so z^L = 1):
                  K̂(z) = Σ_k K̄_k z^k = C̃ (I − Ā z)⁻¹ B̄,  C̃ = C (I − Ā^L),
                        = 2/(1+z) · [C̃ R B − C̃ R P (1 + Q* R P)⁻¹ Q* R B],  R = (g(z) − Λ)⁻¹,
                  g(z) = 2/Δ · (1−z)/(1+z); every product "x R y" is a Cauchy sum Σ_n x_n y_n / (g − λ_n);
                  then K̄ = inverse FFT of K̂.  O((N + L) log …) work instead of L dense matrix powers.
  DSS's kernel    K̄_k = Σ_n C_n B̄_n e^{k Δ λ_n}: a Vandermonde product, O(N L).
  HiPPO-LegS A and its normal-plus-low-rank form (S4's initialisation).
Glossary: N state size · L sequence (and kernel) length · Λ (N,) complex eigenvalues · P, Q (N,) low-rank factors
          · B, C (N,) complex · Δ step · C̃ the C that S4 learns (its kernel needs no power of Ā).
Left out: the layer around the kernel (H channels with their own Δ, a D skip, GELU and a mixing linear), S4's
          halving of the state by conjugate pairs, bidirectional kernels, fast Cauchy kernels (pykeops, CUDA).
"""

from __future__ import annotations

import math

import torch

from effref.alternatives.recurrent import causal_conv_fft, scan_sequential


def _check_step(step: float) -> None:
    if not step > 0:
        raise ValueError(f"step={step} must be positive (Δ, the discretisation step, e.g. 1e-2)")


def _check_length(L: int) -> None:
    if not isinstance(L, int) or L < 1:
        raise ValueError(f"L={L!r} must be a positive integer (the kernel length, usually the sequence length)")


def hippo_legs(N: int) -> torch.Tensor:
    """HiPPO-LegS (N, N): A_nk = −√(2n+1)√(2k+1) below the diagonal, −(n+1) on it, 0 above (float64)."""
    if N < 1:
        raise ValueError(f"N={N} must be a positive integer (the state size)")
    r = torch.sqrt(2 * torch.arange(N, dtype=torch.float64) + 1)
    A = -torch.outer(r, r).tril(-1)  # n > k
    return A - torch.diag(torch.arange(N, dtype=torch.float64) + 1)


def hippo_dplr(N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """S4's initialisation: HiPPO-LegS written as A = V (Λ − p p*) V* with V unitary, and B of LegS.

    A + P Pᵀ (P_n = √(n + ½)) is normal (skew-symmetric plus −½ I), so it diagonalises stably as V Λ V*.
    Returns Λ (N,), p = V* P, b = V* B and V, all complex128; in the basis V the SSM is (Λ − p p*, b, C V).
    """
    A = hippo_legs(N)
    P = torch.sqrt(torch.arange(N, dtype=torch.float64) + 0.5)
    B = torch.sqrt(2 * torch.arange(N, dtype=torch.float64) + 1)
    S = A + torch.outer(P, P)  # normal: −½ I plus a skew-symmetric matrix
    imag, V = torch.linalg.eigh(S.to(torch.complex128) * -1j)  # S = i · (Hermitian) → eigenvalues −½ + i·imag
    Lambda = torch.diagonal(S).mean() + 1j * imag
    return Lambda, V.conj().T @ P.to(V.dtype), V.conj().T @ B.to(V.dtype), V


def discretize_bilinear(A: torch.Tensor, B: torch.Tensor, step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ā, B̄ of S4 for a dense A (N, N) and B (N,): the bilinear (Tustin) transform."""
    _check_step(step)
    I = torch.eye(A.shape[0], dtype=A.dtype)  # noqa: E741
    left = torch.linalg.inv(I - step / 2 * A)  # (I − Δ/2 A)⁻¹
    return left @ (I + step / 2 * A), left @ (step * B)


def discretize_zoh(Lambda: torch.Tensor, B: torch.Tensor, step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ā, B̄ of DSS for a diagonal A = diag(Λ): zero-order hold, elementwise (N,) each."""
    _check_step(step)
    a = torch.exp(step * Lambda)  # (N,)
    return a, (a - 1) / Lambda * B  # Λ⁻¹ (e^{ΔΛ} − 1) B


def kernel_by_powers(Ab: torch.Tensor, Bb: torch.Tensor, C: torch.Tensor, L: int) -> torch.Tensor:
    """K̄_k = C Ā^k B̄ for k < L, by L matrix-vector products (the definition; the reference for the fast forms)."""
    _check_length(L)
    x, K = Bb, []
    for _ in range(L):
        K.append(C @ x)  # C Ā^k B̄
        x = Ab @ x
    return torch.stack(K)  # (L,)


def c_tilde(Lambda: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor, step: float,
            L: int) -> torch.Tensor:
    """C̃ = C (I − Ā^L) for A = Λ − P Q*: the C that S4 trains instead, so that its kernel needs no Ā^L."""
    _check_length(L)
    A = torch.diag(Lambda) - torch.outer(P, Q.conj())
    Ab, _ = discretize_bilinear(A, torch.zeros_like(P), step)
    return C @ (torch.eye(len(Lambda), dtype=Ab.dtype) - torch.linalg.matrix_power(Ab, L))


def s4_kernel(Lambda: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, B: torch.Tensor, Ct: torch.Tensor,
              step: float, L: int) -> torch.Tensor:
    """S4's convolution kernel K̄ (L,) for A = Λ − P Q* (complex), from C̃ = ``Ct``, by Algorithm 1: the
    generating function at the L-th roots of unity (Woodbury, Cauchy sums), then an inverse FFT."""
    _check_step(step)
    _check_length(L)
    if not Lambda.shape == P.shape == Q.shape == B.shape == Ct.shape or Lambda.ndim != 1:
        raise ValueError(f"Lambda, P, Q, B, Ct must all have one shape (N,), got {tuple(Lambda.shape)}, "
                         f"{tuple(P.shape)}, {tuple(Q.shape)}, {tuple(B.shape)}, {tuple(Ct.shape)}")
    z = torch.exp(-2j * math.pi * torch.arange(L, dtype=torch.float64) / L).to(Lambda.dtype)  # (L,) roots of unity
    g = (2.0 / step) * (1 - z) / (1 + z)  # (L,)
    R = 1.0 / (g[:, None] - Lambda[None, :])  # (L, N): the diagonal resolvent (g − Λ)⁻¹ at every root

    def cauchy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return R @ (x * y)  # (L,): Σ_n x_n y_n / (g − λ_n)

    k00, k01 = cauchy(Ct, B), cauchy(Ct, P)
    k10, k11 = cauchy(Q.conj(), B), cauchy(Q.conj(), P)
    at_roots = 2 / (1 + z) * (k00 - k01 * k10 / (1 + k11))  # (L,): K̂(z) by the Woodbury identity
    return torch.fft.ifft(at_roots)  # (L,): K̂ is the DFT of K̄


def dss_kernel(Lambda: torch.Tensor, B: torch.Tensor, C: torch.Tensor, step: float, L: int) -> torch.Tensor:
    """DSS's kernel K̄_k = Σ_n C_n B̄_n e^{kΔλ_n} (L,) for a diagonal A = diag(Λ), zero-order hold."""
    _check_length(L)
    _, Bb = discretize_zoh(Lambda, B, step)
    vandermonde = torch.exp(step * Lambda[:, None] * torch.arange(L, dtype=torch.float64))  # (N, L): e^{kΔλ_n}
    return (C * Bb) @ vandermonde.to(Lambda.dtype)  # (L,)


def ssm_recurrent(Ab: torch.Tensor, Bb: torch.Tensor, C: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """y_k = Re(C x_k), x_k = Ā x_{k−1} + B̄ u_k for u (batch, L); Ā dense (N, N), or (N,) for a diagonal one,
    whose recurrence is elementwise and runs as a scan. Returns y (batch, L)."""
    if Ab.ndim == 1:  # diagonal: N independent scalar recurrences
        a = Ab.expand(*u.shape, -1)  # (batch, L, N)
        x = scan_sequential(a, u[..., None].to(Bb.dtype) * Bb)  # (batch, L, N)
        return (x @ C).real  # (batch, L)
    x, ys = torch.zeros(u.shape[0], Ab.shape[0], dtype=Ab.dtype), []
    for k in range(u.shape[1]):
        x = x @ Ab.T + u[:, k, None] * Bb  # (batch, N)
        ys.append((x @ C).real)
    return torch.stack(ys, dim=1)  # (batch, L)


def ssm_convolve(K: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The convolutional form: y = Re(K̄) ∗ u for u (batch, L), through the FFT. Returns y (batch, L)."""
    return causal_conv_fft(u, K.real.to(u.dtype))
