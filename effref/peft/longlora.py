"""LongLoRA's shifted sparse attention (S²-Attn): local attention in groups, half of the heads shifted.

Paper: Chen, Qian, Tang, Lai, Liu, Han, Jia (2024), "LongLoRA: Efficient Fine-tuning of Long-Context Large
Language Models", arXiv:2309.12307 — §3.2 (S²-Attn, Fig. 2 and Algorithm 1), §3.3 (LoRA plus trainable
embeddings and norms).
Implements: for a sequence of T tokens split into groups of G (T divisible by G), the first half of the heads
attends causally within groups [0, G), [G, 2G), …; the other ⌊H/2⌋ heads do the same after the tokens are
rolled by G/2, so its groups are [G/2, 3G/2), … and the wrap-around group {T − G/2 … T − 1, 0 … G/2 − 1};
information flows between neighbouring groups through the shifted heads. Each query sees at most G keys,
so attention costs O(T·G) instead of O(T²). Inside every group the causal mask is taken on the tokens'
*original* positions, so the wrap-around group never lets the first tokens see the last ones (the rolled
order of the paper's code would). S²-Attn is used for fine-tuning only; inference uses full attention.
Glossary: T sequence length · G ``group_size`` · H heads (the last ⌊H/2⌋ shifted: SmolLM2 has 9) · d_head.
Left out: the flash-attention kernels of the paper's code; training embeddings and norms is a matter of
          ``requires_grad_`` on those parameters next to ``apply_lora``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_NAME = "s2_attn"


def shifted_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int,
                             scale: float | None = None) -> torch.Tensor:
    """S²-Attn of q, k (B, H, T, d_head) and v (B, H, T, d_v), T divisible by ``group_size``: (B, H, T, d_v)."""
    B, H, T = q.shape[:3]
    G = group_size
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v must be (B, H, T, ·) with q and k alike; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)} (repeat grouped key/value heads first)")
    if H < 2:
        raise ValueError(f"S²-Attn shifts half of the heads; H={H} leaves none to shift")
    if G < 2 or G % 2 or T % G:
        raise ValueError(f"group_size={G} must be even and divide the sequence length T={T}; pad the sequence "
                         f"or pick a divisor of {T}")
    half, plain = G // 2, H - H // 2  # the last H // 2 heads are shifted (4 of 9 for an odd count)

    def grouped(x: torch.Tensor) -> torch.Tensor:  # (B, H, T, ·) -> (B, H, n_groups, G, ·), shifted heads rolled
        x = torch.cat([x[:, :plain], x[:, plain:].roll(-half, dims=2)], dim=1)  # token t moves to t − G/2
        return x.view(B, H, T // G, G, x.shape[-1])

    gq, gk, gv = grouped(q), grouped(k), grouped(v)  # (B, H, n_groups, G, ·)
    n_groups, d_v = T // G, v.shape[-1]
    # Every group is a run of consecutive positions, so plain causal attention inside it is right (and takes
    # the fused kernel), except the shifted heads' last group, which wraps around: slots hold positions
    # T − G/2 … T − 1 then 0 … G/2 − 1, and the causal mask must follow those original positions.
    out = F.scaled_dot_product_attention(gq.reshape(B, H * n_groups, G, -1), gk.reshape(B, H * n_groups, G, -1),
                                         gv.reshape(B, H * n_groups, G, d_v), is_causal=True, scale=scale)
    out = out.view(B, H, n_groups, G, d_v)
    if H > plain:
        wrapped = torch.arange(T, device=q.device).roll(-half)[-G:]  # original positions in the last group
        mask = wrapped[:, None] >= wrapped[None, :]  # (G, G): key position <= query position
        last = F.scaled_dot_product_attention(gq[:, plain:, -1], gk[:, plain:, -1], gv[:, plain:, -1],
                                              attn_mask=mask, scale=scale)  # (B, H − plain, G, d_v)
        out = torch.cat([out[:, :, :-1], torch.cat([out[:, :plain, -1], last], dim=1)[:, :, None]], dim=2)
    out = out.reshape(B, H, T, d_v)
    return torch.cat([out[:, :plain], out[:, plain:].roll(half, dims=2)], dim=1)  # roll the shifted heads back


def _hf_s2_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers' attention-function interface: returns ((B, T, H, d_head), None)."""
    if query.shape[2] != key.shape[2]:
        raise ValueError("S²-Attn is a training-time attention over whole sequences; it cannot decode from a "
                         "KV cache — switch back with use_s2_attention(model, None) for generation")
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = shifted_sparse_attention(query, key, value, module.config.s2_group_size, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def use_s2_attention(model: nn.Module, group_size: int | None) -> nn.Module:
    """Switch a transformers LLaMA to S²-Attn with groups of ``group_size`` tokens, or back (``None``)."""
    from transformers import AttentionInterface

    if not hasattr(model, "config") or not hasattr(model.config, "_attn_implementation"):
        raise TypeError(f"use_s2_attention needs a transformers model, got {type(model).__name__}; our "
                        "effref Llama calls scaled_dot_product_attention directly and is not supported")
    if group_size is None:
        model.config._attn_implementation = getattr(model.config, "s2_previous_attention", "sdpa")
        return model
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group_size={group_size} must be an even number >= 2, e.g. T / 4")
    AttentionInterface.register(ATTENTION_NAME, _hf_s2_attention)
    if model.config._attn_implementation != ATTENTION_NAME:
        model.config.s2_previous_attention = model.config._attn_implementation
    model.config.s2_group_size = group_size
    model.config._attn_implementation = ATTENTION_NAME
    return model
