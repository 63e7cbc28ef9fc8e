"""LongNet's dilated attention: dense attention inside segments, on every r-th token, mixed over several (w, r).

Paper: Ding, Ma, Dong, Zhang, Huang, Wang, Zheng, Wei (2023), "LongNet: Scaling Transformers to 1,000,000,000
Tokens", arXiv:2307.02486 — §2.2 (dilated attention and the mixture of patterns), §2.3 (a different offset
per head).
Implements, for one pattern (segment length w, dilation r) and head j with offset s_j = j mod r: cut the sequence
into segments of w tokens; in segment i keep the rows iw + s_j, iw + s_j + r, iw + s_j + 2r, … < (i + 1)w of Q, K
and V; run ordinary (causal) softmax attention among the kept rows of each segment, O_i = softmax(Q̃_i K̃_iᵀ/√d) Ṽ_i;
scatter the rows back (rows not kept get nothing). Each pattern costs N·w/r² score entries instead of N².
Several patterns are mixed by their softmax denominators s_k (a row's Σ_j exp(q·k_j/√d) under pattern k):
  O = Σ_k α_k O_k,  α_k = s_k / Σ_k' s_k'
(computed from log-sum-exps, so exp never overflows). With increasing w and r (the paper: geometric), near
tokens are seen densely and far ones sparsely.
Glossary: N sequence length (T here) · w ``segments`` · r ``dilations`` · s_j offset of head j · O_k the output of
          pattern k · s_k its softmax denominator · α_k its weight in the mixture.
Left out: the distributed algorithm of §3 (segments split across devices, keys all-gathered), FlashAttention
          kernels, and grouped key/value heads.
"""

from __future__ import annotations

import math

import torch


def _check_patterns(segments: tuple[int, ...], dilations: tuple[int, ...]) -> None:
    if len(segments) != len(dilations) or not segments:
        raise ValueError(f"segments={segments} and dilations={dilations} must be non-empty and of equal length: "
                         "one (w, r) pair per pattern")
    for w, r in zip(segments, dilations):
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in (w, r)) or r > w:
            raise ValueError(f"segment w={w!r}, dilation r={r!r}: need integers 1 <= r <= w (e.g. (2048, 1), "
                             "(4096, 2), (8192, 4))")


def dilated_mask(T: int, segment: int, dilation: int, offset: int = 0, causal: bool = True) -> torch.Tensor:
    """(T, T) bool: True where query i and key j interact in pattern (w, r) with head offset s (< r)."""
    _check_patterns((segment,), (dilation,))
    position = torch.arange(T)
    kept = (position % segment - offset % dilation) % dilation == 0  # (T,) rows iw + s + k·r
    same_segment = position[:, None] // segment == position[None, :] // segment  # (T, T)
    mask = same_segment & kept[:, None] & kept[None, :]
    return mask.tril() if causal else mask


def _one_pattern(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int, r: int,
                 causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (B, H, T, d) and log-denominator (B, H, T) of one pattern; rows a head does not keep: 0 and −inf."""
    B, H, T, d = q.shape
    n_segments = math.ceil(T / w)
    pad = n_segments * w - T
    q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))  # (B, H, n·w, d)
    real = torch.arange(n_segments * w, device=q.device) < T  # (n·w,) False on the padding
    out = q.new_zeros(B, H, n_segments * w, d)
    lse = q.new_full((B, H, n_segments * w), float("-inf"))
    for offset in range(min(r, H)):
        heads = torch.arange(offset, H, r, device=q.device)  # the heads with s_j = offset
        rows = (torch.arange(n_segments, device=q.device)[:, None] * w
                + torch.arange(offset, w, r, device=q.device)[None, :])  # (n, m) kept rows per segment
        qs, ks, vs = (t[:, heads][:, :, rows] for t in (q, k, v))  # (B, h', n, m, d)
        scores = qs @ ks.transpose(-1, -2) / math.sqrt(d)  # (B, h', n, m, m)
        visible = real[rows][:, None, :]  # (n, 1, m) keys that exist
        if causal:
            visible = visible & torch.ones(rows.shape[1], rows.shape[1], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
        flat = rows.flatten()  # (n·m,)
        lse[:, heads[:, None], flat[None, :]] = scores.logsumexp(-1).flatten(2)  # (B, h', n·m)
        out[:, heads[:, None], flat[None, :]] = (scores.softmax(-1).nan_to_num(0.0) @ vs).flatten(2, 3)
    return out[:, :, :T], lse[:, :, :T]


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: tuple[int, ...],
                      dilations: tuple[int, ...], causal: bool = True) -> torch.Tensor:
    """The mixture of dilated attentions over the patterns (segments[k], dilations[k]); q, k, v (B, H, T, d),
    returns (B, H, T, d). A query no pattern keeps gets a zero output (include r = 1 to keep every row)."""
    _check_patterns(tuple(segments), tuple(dilations))
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must all be (B, H, T, d)")
    outs, lses = zip(*(_one_pattern(q, k, v, w, r, causal) for w, r in zip(segments, dilations)))
    alpha = torch.stack(lses).softmax(0).nan_to_num(0.0)  # (K, B, H, T): α_k = s_k / Σ s_k'
    return (alpha[..., None] * torch.stack(outs)).sum(0)  # (B, H, T, d)
