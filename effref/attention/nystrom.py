"""Nyströmformer: softmax attention from a few landmark rows and columns (the Nyström method).

Paper: Xiong, Zeng, Chakraborty, Tan, Fung, Li, Singh (2021), "Nyströmformer: A Nyström-Based Algorithm
for Approximating Self-Attention", arXiv:2102.03902 — Section 3 (landmarks, the Nyström form of softmax
attention, the iterative pseudo-inverse).
Pick m landmarks: the means of m consecutive segments of the queries (Q̃) and of the keys (K̃). Three small
softmax matrices stand in for the T × T one:

    Ŝ = softmax(Q K̃ᵀ/√D) · A⁺ · softmax(Q̃ Kᵀ/√D),      A = softmax(Q̃ K̃ᵀ/√D)  (m × m),
    out = [softmax(Q K̃ᵀ/√D) A⁺] [softmax(Q̃ Kᵀ/√D) V]     (T × m)(m × m)(m × D): linear in T.

A⁺ (Moore–Penrose pseudo-inverse) by the iteration of Razavi et al. that the paper uses, matmuls only:
Z₀ = Aᵀ / (‖A‖₁ ‖A‖_∞),   Z_{j+1} = ¼ Z_j (13I − A Z_j (15I − A Z_j (7I − A Z_j))).
With m = T landmarks (segments of one token) Q̃ = Q, K̃ = K and Ŝ = S A⁺ S = S: exact up to the iteration.
Glossary: m ``landmarks`` · Q̃, K̃ landmark queries and keys · A⁺ ``pinv`` · ``pinv_iterations`` (paper: 6).
Left out: the depthwise convolution of V the paper adds as a skip connection. Simplified: the scale
‖A‖₁ ‖A‖_∞ is taken per (batch, head) rather than as the paper's maximum over the batch. Bidirectional only:
segment means mix future tokens into every landmark, so ``causal=True`` raises.
"""

from __future__ import annotations

import math

import torch

from effref.attention.interface import check_qkv, expand_kv, positive_int


def iterative_pinv(a: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore–Penrose pseudo-inverse of each (m × m) matrix in ``a`` (..., m, m) by the iteration above."""
    positive_int("iterations", iterations, "use about 6 (the paper's value) or more")
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)  # (m, m)
    norm_1 = a.abs().sum(dim=-2).amax(dim=-1)  # (...,) max column sum
    norm_inf = a.abs().sum(dim=-1).amax(dim=-1)  # (...,) max row sum
    z = a.transpose(-1, -2) / (norm_1 * norm_inf)[..., None, None]  # (..., m, m)  Z₀
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def segment_means(x: torch.Tensor, landmarks: int) -> torch.Tensor:
    """(B, H, T, D) → (B, H, m, D): the mean of each of m consecutive, nearly equal segments of tokens."""
    return torch.stack([part.mean(dim=2) for part in torch.tensor_split(x, landmarks, dim=2)], dim=2)


def nystrom_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                      landmarks: int = 32, pinv_iterations: int = 6) -> torch.Tensor:
    """Nyström approximation of softmax attention with ``landmarks`` segment-mean landmarks."""
    group = check_qkv(q, k, v, causal)
    positive_int("landmarks", landmarks, "use a number of landmarks between 1 and the sequence length, e.g. 32")
    positive_int("pinv_iterations", pinv_iterations, "use about 6 (the paper's value) or more")
    if causal:
        raise ValueError("nystrom_attention cannot be causal: every landmark averages a segment that reaches "
                         "past the query; use it bidirectionally (causal=False), or pick a causal method such as "
                         "performer_attention")
    if landmarks > q.shape[2] or landmarks > k.shape[2]:
        raise ValueError(f"landmarks={landmarks} exceeds the sequence length ({q.shape[2]} queries, "
                         f"{k.shape[2]} keys); use at most {min(q.shape[2], k.shape[2])}")
    k, v = expand_kv(k, group), expand_kv(v, group)  # (B, H, T, D)
    scale = 1 / math.sqrt(q.shape[-1])
    q_land, k_land = segment_means(q, landmarks), segment_means(k, landmarks)  # (B, H, m, D)
    kernel_left = torch.softmax(q @ k_land.transpose(-1, -2) * scale, dim=-1)  # (B, H, T, m)
    kernel_middle = torch.softmax(q_land @ k_land.transpose(-1, -2) * scale, dim=-1)  # (B, H, m, m)  A
    kernel_right = torch.softmax(q_land @ k.transpose(-1, -2) * scale, dim=-1)  # (B, H, m, T)
    return (kernel_left @ iterative_pinv(kernel_middle, pinv_iterations)) @ (kernel_right @ v)  # (B, H, T, D)
