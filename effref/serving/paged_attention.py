"""PagedAttention, the PyTorch reference: one decoding query per sequence over keys kept in scattered blocks.

Paper: Kwon, Li, Zhuang, Sheng, Zheng, Yu, Gonzalez, Zhang, Stoica (2023), "Efficient Memory Management for
Large Language Model Serving with PagedAttention", arXiv:2309.06180 — §4.1, Eq. 4.
Implements: the KV cache of one layer is a pool of fixed-size blocks, (num_blocks, block_size, n_kv_heads,
d_head); sequence i owns the blocks listed in row i of its block table, in order, and its j-th cached token
sits in block ``block_tables[i, j // block_size]`` at slot ``j % block_size``. The decode query attends to
all ``context_lens[i]`` cached tokens:
  A_ij = exp(q_i·K_j / √d) / Σ_t exp(q_i·K_t / √d),   o_i = Σ_j V_j A_ijᵀ     (Eq. 4, block by block)
This reference turns the block tables into flat slot addresses (``block_slots``, computed once per step and
shared by all layers), gathers the keys/values into a padded dense tensor and calls
scaled_dot_product_attention with a length mask; a kernel (kernels/paged_attention.py) reads the blocks in
place instead.
Glossary: B sequences · H query heads (n_heads) · H_kv key/value heads · d d_head · b block_size · K_j, V_j
          the j-th key/value block · L longest context in the batch.
Left out: the fused kernel (kernels/), alibi/sliding-window variants, quantized blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_tables(name: str, cache: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor) -> None:
    if cache.ndim != 4:
        raise ValueError(f"{name} must have shape (num_blocks, block_size, n_kv_heads, d_head), got "
                         f"{tuple(cache.shape)}")
    if block_tables.ndim != 2 or block_tables.is_floating_point():
        raise ValueError(f"block_tables must be integer block ids of shape (B, max_blocks_per_seq), got "
                         f"{tuple(block_tables.shape)} {block_tables.dtype}")
    if context_lens.ndim != 1 or context_lens.is_floating_point() or len(context_lens) != len(block_tables):
        raise ValueError(f"context_lens must be an integer tensor of shape (B,) = ({len(block_tables)},), got "
                         f"{tuple(context_lens.shape)} {context_lens.dtype}")
    num_blocks, block_size = cache.shape[:2]
    capacity = block_tables.shape[1] * block_size
    if len(context_lens) and (int(context_lens.min()) < 1 or int(context_lens.max()) > capacity):
        raise ValueError(f"context_lens must lie in [1, max_blocks_per_seq * block_size = {capacity}], got "
                         f"min {int(context_lens.min())}, max {int(context_lens.max())}; a sequence needs at "
                         "least one cached token and a block-table row long enough for all of them")
    n_used = (context_lens.long() + block_size - 1) // block_size  # (B,) blocks each sequence owns
    used = torch.arange(block_tables.shape[1], device=block_tables.device)[None, :] < n_used[:, None]
    ids = block_tables[used]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        raise ValueError(f"block_tables holds block id {int(ids.min()) if int(ids.min()) < 0 else int(ids.max())}"
                         f" outside [0, num_blocks={num_blocks}) within a sequence's first "
                         "ceil(context_len / block_size) entries")


def block_slots(block_tables: torch.Tensor, context_lens: torch.Tensor,
                block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat cache addresses (B, L) of every sequence's tokens (block · b + offset) and which are real (B, L).

    L is the longest context; a shorter sequence's extra addresses point at slot 0 and are marked invalid.
    Computed once, the addresses serve every layer (all layers share the block tables).
    """
    L = int(context_lens.max())
    position = torch.arange(L, device=block_tables.device)  # (L,)
    valid = position[None, :] < context_lens[:, None]  # (B, L)
    block = block_tables.long().gather(1, (position // block_size).clamp(max=block_tables.shape[1] - 1)
                                       .expand(len(block_tables), L))  # (B, L) physical block of each token
    slots = (block * block_size + position % block_size).masked_fill(~valid, 0)  # (B, L)
    return slots, valid


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor,
              context_lens: torch.Tensor | int) -> torch.Tensor:
    """The cached entries of every sequence as one padded dense tensor (B, L, n_kv_heads, d_head).

    ``block_tables`` may be one row (max_blocks,) with an int ``context_lens``; then the result is
    (context_len, n_kv_heads, d_head). Positions past a sequence's length are zeros.
    """
    single = block_tables.ndim == 1
    if single:
        block_tables = block_tables[None]
    if isinstance(context_lens, int):
        context_lens = torch.tensor([context_lens] * len(block_tables), device=block_tables.device)
    _check_tables("cache", cache, block_tables, context_lens)
    slots, valid = block_slots(block_tables, context_lens, cache.shape[1])
    dense = cache.flatten(0, 1)[slots].masked_fill(~valid[:, :, None, None], 0)  # (B, L, H_kv, d)
    return dense[0] if single else dense


def attend_slots(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 valid: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The unchecked core: q (B, H, d) attends to the cache entries at ``slots`` (B, L) where ``valid``."""
    k = k_cache.flatten(0, 1)[slots].transpose(1, 2)  # (B, H_kv, L, d)
    v = v_cache.flatten(0, 1)[slots].transpose(1, 2)  # (B, H_kv, L, d)
    out = F.scaled_dot_product_attention(q[:, :, None, :], k.to(q.dtype), v.to(q.dtype),
                                         attn_mask=valid[:, None, None, :], scale=scale,
                                         enable_gqa=True)  # (B, H, 1, d): head h reads kv head h // groups
    return out[:, :, 0]  # (B, H, d)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    scale: float | None = None) -> torch.Tensor:
    """Decode attention over a paged cache: q (B, n_heads, d_head) -> (B, n_heads, d_head).

    ``k_cache``/``v_cache`` are one layer's block pools (num_blocks, block_size, n_kv_heads, d_head);
    ``block_tables`` (B, max_blocks_per_seq) lists each sequence's blocks in order (entries past its last
    block are ignored); ``context_lens`` (B,) counts its cached tokens, all of which it attends to. Query
    head h reads key/value head h // (n_heads // n_kv_heads) (grouped-query attention). ``scale`` defaults
    to 1/√d_head.
    """
    if q.ndim != 3:
        raise ValueError(f"q must have shape (B, n_heads, d_head) (one decode query per sequence), got "
                         f"{tuple(q.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have the "
                         "same shape (num_blocks, block_size, n_kv_heads, d_head)")
    _check_tables("k_cache", k_cache, block_tables, context_lens)
    B, H, d = q.shape
    if len(block_tables) != B:
        raise ValueError(f"block_tables has {len(block_tables)} rows but q has B={B} sequences")
    if k_cache.shape[3] != d:
        raise ValueError(f"q has d_head={d} but the caches have d_head={k_cache.shape[3]}")
    if H % k_cache.shape[2]:
        raise ValueError(f"n_heads={H} is not a multiple of n_kv_heads={k_cache.shape[2]}; each key/value "
                         "head must serve a whole group of query heads")
    slots, valid = block_slots(block_tables, context_lens, k_cache.shape[1])
    return attend_slots(q, k_cache, v_cache, slots, valid, scale)
