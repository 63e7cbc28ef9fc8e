"""Fixed sparse patterns: Sparse Transformer (strided, fixed), Longformer (window + global), Big Bird (+ random).

Papers: Child, Gray, Radford, Sutskever (2019), "Generating Long Sequences with Sparse Transformers",
arXiv:1904.10509 — Section 4 (strided and fixed patterns); Beltagy, Peters, Cohan (2020), "Longformer",
arXiv:2004.05150 — Section 3.1; Zaheer et al. (2020), "Big Bird", arXiv:2007.14062 — Section 2.
Each query i attends only to a set A_i of keys, and the softmax runs over that set:

    out_i = Σ_{j ∈ A_i} softmax_j(q_i·k_j / √D) v_j.

The sets, for stride l (≈ √T), window w, g global tokens, r random keys (causal: only j ≤ i is kept):
    strided   A_i = {j : |i − j| < l} ∪ {j : (i − j) mod l = 0}                         (Child: image-like data)
    fixed     A_i = {j : ⌊j/l⌋ = ⌊i/l⌋} ∪ {j : j mod l ≥ l − c}                          (c summary columns)
    Longformer A_i = {j : |i − j| ≤ w} ∪ {0 … g−1};  the g global queries attend to every key
    Big Bird  the Longformer set ∪ r keys drawn at random for each query.

A pattern is stored as a list of key positions per query, ``index`` (T, K) with ``valid`` (T, K) marking
real, distinct entries; the attention gathers those K keys per query, so time grows as T·K·D, not T², and
memory as (queries per chunk)·K·D. ``SparsePattern.mask()`` expands the same sets into the (T, T) boolean mask for checking.
Glossary: l ``stride`` · c ``summary`` · w ``window`` · g ``n_global`` · r ``n_random`` · K keys per query.
Simplified: Big Bird's blocks (it draws window, global and random keys per block of 64 tokens to use dense
matmuls) are single tokens here; Longformer's dilated windows and its separate global projections are left
out; the factorised heads of the Sparse Transformer (one pattern per head or per layer) are one merged set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from effref.attention.interface import check_qkv, expand_kv, positive_int, softmax_attention


@dataclass(frozen=True)
class SparsePattern:
    """Key positions per query: ``index`` (T, K) long, ``valid`` (T, K) bool (False: padding or a repeat);
    queries 0 … ``n_global`` − 1 attend to every key instead."""

    index: torch.Tensor
    valid: torch.Tensor
    n_global: int = 0

    def mask(self, causal: bool = False) -> torch.Tensor:
        """The (T, T) boolean mask of the same sets: True where query i attends to key j."""
        T = self.index.shape[0]
        mask = torch.zeros(T, T, dtype=torch.bool)
        rows = torch.arange(T)[:, None].expand_as(self.index)  # (T, K)
        mask[rows[self.valid], self.index[self.valid]] = True
        mask[:self.n_global] = True
        return mask & torch.ones(T, T, dtype=torch.bool).tril() if causal else mask


def _pattern(index: torch.Tensor, causal: bool, n_global: int = 0) -> SparsePattern:
    """Keep in-range (and, causal, past) keys; drop repeats so that no key is counted twice in a softmax."""
    T = index.shape[0]
    queries = torch.arange(T)[:, None]  # (T, 1)
    valid = (index >= 0) & (index < T) & ((index <= queries) if causal else True)  # (T, K)
    index = torch.where(valid, index, T)  # invalid entries sort last
    index, _ = index.sort(dim=1)
    repeat = torch.zeros_like(valid)
    repeat[:, 1:] = index[:, 1:] == index[:, :-1]
    valid = (index < T) & ~repeat
    return SparsePattern(index.clamp(max=T - 1), valid, n_global)


def strided_pattern(T: int, stride: int, causal: bool = True) -> SparsePattern:
    """Sparse Transformer, strided: the last ``stride`` positions and every ``stride``-th one before them."""
    positive_int("stride", stride, "use about √T, e.g. 32 for 1024 tokens")
    near = torch.arange(-(stride - 1), stride)  # offsets |i − j| < l
    far = stride * torch.arange(-(T // stride), T // stride + 1)  # offsets that are multiples of l
    offsets = torch.cat([near, far])  # (K,)
    return _pattern(torch.arange(T)[:, None] - offsets[None, :], causal)


def fixed_pattern(T: int, stride: int, summary: int = 1, causal: bool = True) -> SparsePattern:
    """Sparse Transformer, fixed: the query's own block of ``stride`` and the last ``summary`` of every block."""
    positive_int("stride", stride, "use the block length, e.g. 32")
    positive_int("summary", summary, "use the summary columns per block c, 1 ≤ c ≤ stride")
    if summary > stride:
        raise ValueError(f"summary={summary} exceeds stride={stride}; use 1 ≤ summary ≤ stride")
    own_block = (torch.arange(T)[:, None] // stride) * stride + torch.arange(stride)[None, :]  # (T, l)
    blocks = torch.arange(-(-T // stride)) * stride  # (n_blocks,) first position of each block
    summaries = (blocks[:, None] + torch.arange(stride - summary, stride)[None, :]).flatten()  # (n_blocks·c,)
    return _pattern(torch.cat([own_block, summaries.expand(T, -1)], dim=1), causal)


def random_keys(T: int, n_random: int, causal: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """(T, r) key positions drawn uniformly for each query: from 0 … T−1, or (causal) from 0 … i."""
    limit = torch.arange(1, T + 1)[:, None] if causal else torch.full((T, 1), T)  # (T, 1) keys each may draw
    return (torch.rand(T, n_random, generator=generator) * limit).long()  # (T, r)


def window_global_pattern(T: int, window: int, n_global: int = 0, causal: bool = False,
                          random: torch.Tensor | None = None) -> SparsePattern:
    """Longformer's sliding window of ±``window`` plus ``n_global`` global tokens; Big Bird adds ``random``
    (T, r) key positions per query (see ``random_keys``)."""
    positive_int("window", window, "use the one-sided window w ≥ 1, e.g. 32")
    if isinstance(n_global, bool) or not isinstance(n_global, int) or not 0 <= n_global <= T:
        raise ValueError(f"n_global={n_global!r} must be an integer in [0, T={T}]")
    offsets = torch.arange(-window, window + 1)  # (2w + 1,)
    parts = [torch.arange(T)[:, None] + offsets[None, :], torch.arange(n_global).expand(T, -1)]
    if random is not None:
        parts.append(random)
    return _pattern(torch.cat(parts, dim=1), causal, n_global)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: SparsePattern, *,
                     causal: bool = False, query_chunk: int = 256, dense_mask: bool = False) -> torch.Tensor:
    """Softmax attention of each query over its pattern's keys only: gathers K keys per query (T·K·D work),
    ``query_chunk`` queries at a time, so the gathered keys never exceed query_chunk · K · D per head.

    ``dense_mask=True`` applies the same sets as a (T, T) mask in one fused SDPA call instead: quadratic
    memory, but faster for short sequences (training a small model); the result is the same.
    """
    group = check_qkv(q, k, v, causal)
    positive_int("query_chunk", query_chunk, "use the queries gathered at once, e.g. 256")
    T = q.shape[2]
    if pattern.index.shape[0] != T or k.shape[2] != T:
        raise ValueError(f"the pattern was built for {pattern.index.shape[0]} tokens but q has {q.shape[2]} and "
                         f"k has {k.shape[2]}; build it for the same length (self-attention)")
    k, v = expand_kv(k, group), expand_kv(v, group)  # (B, H, T, D)
    if dense_mask:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=pattern.mask(causal).to(q.device))
    index, valid = pattern.index.to(q.device), pattern.valid.to(q.device)  # (T, K)
    outputs = []
    for first in range(0, T, query_chunk):
        rows = slice(first, first + query_chunk)
        k_near, v_near = k[:, :, index[rows]], v[:, :, index[rows]]  # (B, H, chunk, K, D)
        scores = torch.einsum("bhtd,bhtkd->bhtk", q[:, :, rows], k_near) / math.sqrt(q.shape[-1])  # (B,H,chunk,K)
        weights = torch.softmax(scores.masked_fill(~valid[rows], float("-inf")), dim=-1)
        outputs.append(torch.einsum("bhtk,bhtkd->bhtd", weights, v_near))  # (B, H, chunk, D)
    out = torch.cat(outputs, dim=2)  # (B, H, T, D)
    g = pattern.n_global
    if g:  # global queries see every key (the past only, when causal): g dense rows
        rows_mask = torch.ones(g, T, dtype=torch.bool, device=q.device)
        if causal:
            rows_mask = rows_mask.tril()
        out = torch.cat([softmax_attention(q[:, :, :g], k, v, mask=rows_mask), out[:, :, g:]], dim=2)
    return out


def sparse_transformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                                 stride: int, mode: str = "strided", summary: int = 1,
                                 dense_mask: bool = False) -> torch.Tensor:
    """Sparse Transformer attention with the ``"strided"`` or ``"fixed"`` pattern of stride l."""
    if mode not in ("strided", "fixed"):
        raise ValueError(f"mode={mode!r} must be 'strided' or 'fixed'")
    T = q.shape[2] if isinstance(q, torch.Tensor) and q.dim() == 4 else 0
    pattern = strided_pattern(T, stride, causal) if mode == "strided" else fixed_pattern(T, stride, summary, causal)
    return sparse_attention(q, k, v, pattern, causal=causal, dense_mask=dense_mask)


def longformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                         window: int, n_global: int = 0, dense_mask: bool = False) -> torch.Tensor:
    """Longformer: a sliding window of ±``window`` keys, plus ``n_global`` tokens that see and are seen by all."""
    T = q.shape[2] if isinstance(q, torch.Tensor) and q.dim() == 4 else 0
    return sparse_attention(q, k, v, window_global_pattern(T, window, n_global, causal), causal=causal,
                            dense_mask=dense_mask)


def bigbird_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, window: int,
                      n_global: int = 0, n_random: int = 3, seed: int = 0, dense_mask: bool = False,
                      ) -> torch.Tensor:
    """Big Bird: Longformer's window and global tokens plus ``n_random`` random keys per query (from ``seed``)."""
    T = q.shape[2] if isinstance(q, torch.Tensor) and q.dim() == 4 else 0
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise ValueError(f"n_random={n_random!r} must be an integer ≥ 0")
    random = random_keys(T, n_random, causal, torch.Generator().manual_seed(seed))
    return sparse_attention(q, k, v, window_global_pattern(T, window, n_global, causal, random), causal=causal,
                            dense_mask=dense_mask)
