"""Performer's FAVOR+: softmax attention estimated with positive orthogonal random features.

Paper: Choromanski, Likhosherstov, Dohan, Song, Gane, Sarlos, Hawkins, Davis, Mohiuddin, Kaiser, Belanger,
Colwell, Weller (2021), "Rethinking Attention with Performers", arXiv:2009.14794 — Lemma 1, Section 2.4.
The softmax kernel is an expectation over Gaussian vectors ω ~ N(0, I_D) (Lemma 1):

    exp(xᵀy) = E_ω[ exp(ωᵀx − ‖x‖²/2) · exp(ωᵀy − ‖y‖²/2) ],

so with m samples ω_1 … ω_m the positive features φ(x) = exp(Ωx − ‖x‖²/2) / √m give an unbiased estimate
φ(x)ᵀφ(y) ≈ exp(xᵀy), and attention becomes linear attention with these features (x = q / D^{1/4},
y = k / D^{1/4}, so xᵀy = qᵀk / √D). "Orthogonal" (Section 2.4): the ω's are drawn in blocks of D exactly
orthogonal directions (QR of a Gaussian matrix), each rescaled to the length of a Gaussian vector; the
estimate stays unbiased and its variance drops. Its error shrinks like 1/√m as the budget m grows.
Glossary: m ``features`` · Ω (m × D) ``omega`` · φ positive random features.
Left out: redrawing Ω during training and the generalised kernels (ReLU features); Ω is drawn once from
``seed`` and kept. Each feature is divided by e^{max} (a per-row max for queries, one max for all keys), a
constant that cancels between numerator and denominator and keeps exp from overflowing.
"""

from __future__ import annotations

import torch

from effref.attention.interface import check_qkv, expand_kv, positive_int
from effref.attention.linear import kernel_attention


def orthogonal_gaussian(features: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Ω (features, dim): blocks of ``dim`` orthogonal rows, each row with the length of a N(0, I) vector."""
    positive_int("features", features, "use the number of random features, e.g. 256")
    blocks = []
    for _ in range(-(-features // dim)):  # ⌈m / D⌉ blocks of D orthogonal directions
        gaussian = torch.randn(dim, dim, generator=generator)  # (D, D)
        directions, triangle = torch.linalg.qr(gaussian)  # (D, D) orthonormal columns
        directions = directions * torch.sign(torch.diagonal(triangle))  # sign fix: uniformly random rotation
        blocks.append(directions.T)
    omega = torch.cat(blocks)[:features]  # (m, D) unit rows
    lengths = torch.randn(features, dim, generator=generator).norm(dim=1)  # (m,) chi-distributed, like ‖ω‖
    return omega * lengths[:, None]


def favor_features(x: torch.Tensor, omega: torch.Tensor, is_query: bool) -> torch.Tensor:
    """φ(x) = exp(Ωx − ‖x‖²/2 − c) / √m for x (B, H, T, D) already scaled by D^{-1/4}; c is the stabiliser."""
    projected = x @ omega.T  # (B, H, T, m)  Ωx
    exponent = projected - (x * x).sum(dim=-1, keepdim=True) / 2  # (B, H, T, m)
    stabiliser = exponent.amax(dim=-1, keepdim=True) if is_query else exponent.amax(dim=(-2, -1), keepdim=True)
    return torch.exp(exponent - stabiliser.detach()) / omega.shape[0] ** 0.5


def performer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        features: int = 256, seed: int = 0) -> torch.Tensor:
    """FAVOR+ attention with ``features`` positive orthogonal random features drawn from ``seed``."""
    group = check_qkv(q, k, v, causal)
    positive_int("features", features, "use the number of random features, e.g. 256")
    k, v = expand_kv(k, group), expand_kv(v, group)  # (B, H, T, D)
    D = q.shape[-1]
    omega = orthogonal_gaussian(features, D, torch.Generator().manual_seed(seed)).to(q)  # (m, D)
    scale = D ** -0.25  # x = q / D^{1/4}, y = k / D^{1/4}:  xᵀy = qᵀk / √D
    return kernel_attention(favor_features(q * scale, omega, True), favor_features(k * scale, omega, False), v,
                            causal)
