"""Where a LLaMA's positions come from: the shared machinery of the long-context position schemes.

Paper: Su et al. (2021), "RoFormer", arXiv:2104.09864 — Eq. 34 (RoPE), the scheme every module of this package
rescales or replaces; survey §2.5.3 (Wan et al.), "Extrapolation and Interpolation".
Implements, for our :class:`~effref.models.llama.Llama` (whose ``rope_cos``/``rope_sin`` buffers hold the
cos/sin of angle m·θ_i for every position m < max_seq_len, sliced by the KV-cache offset on each call):
  ``install_rope_tables``  replace those tables (a scaled RoPE: rope_scaling.py) and the context length;
  ``at_positions``         run the model at explicit position ids p_0 < p_1 < … instead of 0, 1, … (PoSE);
  ``PositionalAttention``  LLaMA's attention with two hooks, ``rotate`` (q, k at absolute positions) and
                           ``bias`` (added to q·kᵀ/√d before the softmax), for the schemes that are not a table
                           of angles (ALiBi: alibi.py, xPOS: xpos.py);
  ``swap_attention``       put such an attention into every block, keeping the projection weights.
Glossary: T new tokens · S keys attended to (cached + new; the T new ones last) · offset = cache.length, the
          position of the first new token · d_head head size · θ_i = θ^(−2i/d_head) angle per position of pair i.
Left out: a ``position_ids`` argument per sequence of a batch (``at_positions`` gives one list to the whole
          batch), and padding masks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from effref.models.llama import Attention, KVCache, Llama, apply_rope, require_llama


def install_rope_tables(model: Llama, cos: torch.Tensor, sin: torch.Tensor) -> Llama:
    """Make ``model`` rotate with the tables ``cos``, ``sin`` (max_len, d_head); returns the model.

    The context length ``model.cfg.max_seq_len`` becomes ``max_len`` (the model refuses longer inputs), and
    the tables take the device and dtype of the model's own. The weights are untouched.
    """
    require_llama(model, "model")
    d_head = model.cfg.d_head
    if cos.ndim != 2 or cos.shape != sin.shape or cos.shape[1] != d_head or cos.shape[0] < 1:
        raise ValueError(f"cos and sin must both have shape (max_len, d_head={d_head}) with max_len >= 1, got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}; build them for this model's head size")
    device, dtype = model.rope_cos.device, model.rope_cos.dtype  # as the model keeps its own (bf16 after .to)
    model.rope_cos = cos.to(device=device, dtype=dtype)  # registered buffers: replaced, not added
    model.rope_sin = sin.to(device=device, dtype=dtype)
    model.cfg = dataclasses.replace(model.cfg, max_seq_len=cos.shape[0])
    return model


@contextmanager
def at_positions(model: Llama, position_ids: torch.Tensor) -> Iterator[Llama]:
    """Inside the block, ``model(ids)`` with T = len(position_ids) tokens rotates token t by the angles of
    position ``position_ids[t]`` (shared by every sequence of the batch) instead of t.

    Used without a cache. The model's own tables supply the angles, so positions must be < max_seq_len.
    """
    require_llama(model, "model")
    if position_ids.ndim != 1 or position_ids.is_floating_point() or len(position_ids) == 0:
        raise ValueError(f"position_ids must be a non-empty 1-D tensor of integer positions, got "
                         f"{tuple(position_ids.shape)} {position_ids.dtype}")
    low, high = int(position_ids.min()), int(position_ids.max())
    if low < 0 or high >= model.rope_cos.shape[0]:
        raise ValueError(f"position_ids run from {low} to {high}, outside the model's tables 0.."
                         f"{model.rope_cos.shape[0] - 1}; install longer tables first (install_rope_tables)")
    cos, sin, cfg = model.rope_cos, model.rope_sin, model.cfg
    index = position_ids.to(cos.device)
    model.rope_cos, model.rope_sin = cos[index], sin[index]  # (T, d_head): row t is position_ids[t]
    model.cfg = dataclasses.replace(cfg, max_seq_len=len(position_ids))
    try:
        yield model
    finally:
        model.rope_cos, model.rope_sin, model.cfg = cos, sin, cfg


class PositionalAttention(Attention):
    """LLaMA attention whose positions come from ``rotate`` and ``bias`` (defaults: RoPE, no bias).

    Queries are the last T of the S keys: query t sits at position S − T + t (offset + t), as in our KVCache.
    """

    def rotate(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries (B, n_heads, T, d_head) and keys (B, n_kv_heads, T, d_head) of positions offset..offset+T−1."""
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def bias(self, T: int, S: int, device: torch.device) -> torch.Tensor | None:
        """An additive (n_heads, T, S) bias on the scaled scores, future keys at −inf; None: causal only."""
        return None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        offset = 0 if cache is None else cache.length  # read before the cache stores these keys
        q = self.q_proj(x).view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, n_heads, T, d_head)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.d_head).transpose(1, 2)  # (B, n_kv, T, d_head)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.d_head).transpose(1, 2)  # (B, n_kv, T, d_head)
        q, k = self.rotate(q, k, cos, sin, offset)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, n_kv, S, d_head)
        S = k.shape[2]
        groups = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(groups, dim=1)  # (B, n_heads, S, d_head)
        v = v.repeat_interleave(groups, dim=1)  # (B, n_heads, S, d_head)
        bias = self.bias(T, S, x.device)
        if bias is not None:  # the bias carries the causal mask (−inf on future keys)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (B, n_heads, T, d_head)
        elif T == S or T == 1:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # (B, n_heads, T, d_head)
        else:
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)  # (T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, n_heads, T, d_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.d_head))  # (B, T, d_model)


def causal_positions(T: int, S: int, device: torch.device | None = None) -> torch.Tensor:
    """Query position minus key position, (T, S), for T new queries that are the last T of S keys."""
    query = torch.arange(S - T, S, device=device)[:, None]  # (T, 1)
    key = torch.arange(S, device=device)[None, :]  # (1, S)
    return query - key  # (T, S); negative = a future key


def swap_attention(model: Llama, attention: type[PositionalAttention], **options) -> Llama:
    """Replace every block's attention by ``attention(cfg, layer, **options)`` with the same weights."""
    require_llama(model, "model")
    if not (isinstance(attention, type) and issubclass(attention, PositionalAttention)):
        raise TypeError(f"attention must be a PositionalAttention subclass, got {attention!r}")
    for i, block in enumerate(model.blocks):
        old = block.attn
        new = attention(model.cfg, old.layer, **options)
        new.load_state_dict(old.state_dict(), strict=True)
        block.attn = new.to(device=old.q_proj.weight.device, dtype=old.q_proj.weight.dtype)
    return model

