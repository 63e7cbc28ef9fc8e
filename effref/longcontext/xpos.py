"""xPOS: RoPE with an exponential decay, so that attention to distant tokens fades smoothly.

Paper: Sun, Dong, Patra, Ma, Huang, Benhaim, Chaudhary, Song, Wei (2023), "A Length-Extrapolatable
Transformer", ACL 2023, arXiv:2212.10554 — §3 (attention resolution, Extrapolatable Position Embedding).
Implements: queries and keys are turned by RoPE and scaled per pair, in opposite directions:
  q̃_m = RoPE(q, m) ⊙ ζ^(m/B),   k̃_n = RoPE(k, n) ⊙ ζ^(−n/B),   ζ_i = (2i/d + γ) / (1 + γ),
so that q̃_m · k̃_n = Σ_i ζ_i^((m−n)/B) · (pair i of RoPE's q·k): a function of m − n only (relative, like
RoPE), with every pair's contribution shrinking as the distance grows (ζ_i < 1), fastest for the
high-frequency pairs (small i), whose oscillation made RoPE's scores erratic at long distances.
``use_xpos`` turns our Llama into an xPOS model (train it from scratch).
Glossary: m query position · n key position · d d_head · ζ_i decay of pair i (layout: pair i in columns i and
          i + d/2, as our RoPE) · γ = 0.4 · B scale_base = 512 · center c: positions enter as m − c (the score
          does not depend on c; it keeps ζ^(±m/B) in range for long inputs, the reference code centers too).
Left out: blockwise causal attention (BCA), the paper's inference-time windowing that its extrapolation
          results also rely on; training recipes of the paper's LEX models.
"""

from __future__ import annotations

import torch

from effref.longcontext.positions import PositionalAttention, swap_attention
from effref.models.llama import Llama, LlamaConfig, apply_rope, require_llama


def xpos_decay(d_head: int, gamma: float = 0.4) -> torch.Tensor:
    """ζ (d_head,): ζ_i = (2i/d + γ)/(1 + γ) for pair i, repeated in columns i and i + d/2."""
    if isinstance(d_head, bool) or not isinstance(d_head, int) or d_head < 2 or d_head % 2:
        raise ValueError(f"d_head={d_head!r} must be an even positive integer (RoPE turns pairs)")
    if not gamma > 0:
        raise ValueError(f"gamma={gamma!r} must be positive (the paper's 0.4); it keeps every ζ_i in (0, 1]")
    zeta = (torch.arange(0, d_head, 2, dtype=torch.float32) / d_head + gamma) / (1 + gamma)  # (d_head/2,)
    return torch.cat([zeta, zeta])  # (d_head,)


def xpos_scale(d_head: int, positions: torch.Tensor, gamma: float = 0.4, scale_base: float = 512.0,
               center: int = 0) -> torch.Tensor:
    """ζ^((p − c)/B) for each position p, (len(positions), d_head): the factor on queries (keys: its inverse)."""
    if not scale_base > 0:
        raise ValueError(f"scale_base={scale_base!r} must be positive (the paper's 512)")
    exponent = (positions.float() - center)[:, None] / scale_base  # (T, 1)
    return xpos_decay(d_head, gamma).to(positions.device) ** exponent  # (T, d_head)


class XPosAttention(PositionalAttention):
    """LLaMA attention with xPOS: RoPE from the model's tables, then the decay on queries, its inverse on keys."""

    def __init__(self, cfg: LlamaConfig, layer: int, gamma: float = 0.4, scale_base: float = 512.0,
                 center: int = 0):
        super().__init__(cfg, layer)
        xpos_decay(cfg.d_head, gamma)  # validates
        self.gamma, self.scale_base, self.center = gamma, scale_base, center

    def rotate(self, q, k, cos, sin, offset):
        T = q.shape[2]
        positions = torch.arange(offset, offset + T, device=q.device)  # (T,)
        scale = xpos_scale(self.d_head, positions, self.gamma, self.scale_base, self.center).to(q.dtype)  # (T, d)
        return apply_rope(q, cos, sin) * scale, apply_rope(k, cos, sin) / scale  # q̃_m, k̃_n


def use_xpos(model: Llama, gamma: float = 0.4, scale_base: float = 512.0, center: int | None = None) -> Llama:
    """Make ``model`` (in place) an xPOS model; returns it. ``center`` defaults to half the context length.
    Meant for a model about to be trained (the decay changes what a RoPE-trained model computes)."""
    require_llama(model, "model")
    center = model.cfg.max_seq_len // 2 if center is None else center
    return swap_attention(model, XPosAttention, gamma=gamma, scale_base=scale_base, center=center)
