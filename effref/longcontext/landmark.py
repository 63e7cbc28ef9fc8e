"""Landmark attention: each block of the past is represented by one landmark key; a query picks blocks by their
landmarks, then attends inside them.

Paper: Mohtashami, Jaggi (2023), "Landmark Attention: Random-Access Infinite Context Length for Transformers",
NeurIPS 2023, arXiv:2305.16300 — §3.1 (grouped softmax), §3.2 (retrieving the top-k blocks at inference).
Implements, for query i in block b_i (blocks of ℓ tokens) with scores s_ij = q_i·k_j/√d and landmark scores
g_ib = q_i·L_b/√d of the earlier blocks b < b_i:
  top level     one softmax over the query's own block's tokens j ≤ i (scores s_ij) and the earlier blocks'
                landmarks (scores g_ib) — at inference only the ``top_k`` best landmarks stay;
  inside        a block b < b_i receives the top-level weight of its landmark, shared among its tokens by a
                softmax over that block:  a_ij = softmax_top(g_ib(j)) · softmax_{j' ∈ b(j)}(s_ij'),
so only the chosen blocks' keys and values need to be in memory. If L_b makes g_ib equal the block's
log-sum-exp, log Σ_{j∈b} e^{s_ij}, the grouped softmax is exactly softmax attention (tests check this): the
paper trains the landmark tokens towards that role.
Glossary: ℓ ``block_size`` · b_i block of query i · L_b ``landmarks`` (B, H, n_blocks, d) · g block score · k
          ``top_k`` · a_ij attention weight.
Simplified: the paper learns L_b as the key of a landmark token inserted after every block (and trains the model
            with it); without training we offer the mean key of each block as a stand-in (``landmarks=None``),
            which retrieves worse. Left out: the cache of blocks offloaded to CPU and Triton kernels; this
            reference builds the full T × T weights.
"""

from __future__ import annotations

import math

import torch


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}={value!r} must be a positive integer")


def grouped_softmax_weights(scores: torch.Tensor, block_scores: torch.Tensor, block_size: int,
                            top_k: int | None = None) -> torch.Tensor:
    """Attention weights a (B, H, T, T) from token scores s (B, H, T, T) and block scores g (B, H, T, n_blocks),
    n_blocks = ⌈T / ℓ⌉ (only the complete blocks before each query's own are read); ``top_k`` keeps each
    query's best earlier blocks by g."""
    _check_positive("block_size", block_size)
    _check_positive("top_k", top_k)
    B, H, T, _ = scores.shape
    n_blocks = math.ceil(T / block_size)
    if block_scores.shape != (B, H, T, n_blocks):
        raise ValueError(f"block_scores must be (B, H, T, n_blocks) = {(B, H, T, n_blocks)}, got "
                         f"{tuple(block_scores.shape)}")
    block = torch.arange(T, device=scores.device) // block_size  # (T,) block of every position
    own = (block[:, None] == block[None, :]) & torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
    earlier = torch.arange(n_blocks, device=scores.device)[None, :] < block[:, None]  # (T, n_blocks)
    g = block_scores.masked_fill(~earlier, float("-inf"))  # (B, H, T, n_blocks)
    if top_k is not None and top_k < n_blocks:
        kth = g.topk(top_k, dim=-1).values[..., -1:]  # (B, H, T, 1) the k-th best landmark score
        g = g.masked_fill(g < kth, float("-inf"))
    top = torch.cat([scores.masked_fill(~own, float("-inf")), g], dim=-1).softmax(-1)  # (B, H, T, T + n_blocks)
    p_own, p_block = top[..., :T], top[..., T:]
    pad = n_blocks * block_size - T  # group the keys by block: (B, H, T, n_blocks, ℓ)
    grouped = torch.nn.functional.pad(scores, (0, pad), value=float("-inf")).view(B, H, T, n_blocks, block_size)
    inside = grouped.softmax(-1).flatten(-2)[..., :T]  # (B, H, T, T): softmax within each key's block
    return p_own + p_block[..., block] * inside * earlier[:, block]  # (B, H, T, T)


def block_mean_keys(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """The training-free stand-in for landmarks: the mean key of every block, (B, H, ⌈T/ℓ⌉, d)."""
    _check_positive("block_size", block_size)
    B, H, T, d = k.shape
    n_blocks = math.ceil(T / block_size)
    padded = torch.nn.functional.pad(k, (0, 0, 0, n_blocks * block_size - T))  # (B, H, n·ℓ, d)
    counts = torch.full((n_blocks,), block_size, device=k.device)
    counts[-1] = T - (n_blocks - 1) * block_size
    return padded.view(B, H, n_blocks, block_size, d).sum(3) / counts[:, None].to(k.dtype)


def landmark_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int,
                       top_k: int | None = None, landmarks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal landmark attention for q, k, v (B, H, T, d): own block token by token, earlier blocks through
    their ``landmarks`` (B, H, ⌈T/ℓ⌉, d; default: mean keys), the ``top_k`` best of them. Returns (B, H, T, d)."""
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must all be (B, H, T, d)")
    landmarks = block_mean_keys(k, block_size) if landmarks is None else landmarks
    B, H, T, d = q.shape
    if landmarks.shape != (B, H, math.ceil(T / block_size), d):
        raise ValueError(f"landmarks must be (B, H, n_blocks, d) = {(B, H, math.ceil(T / block_size), d)}, got "
                         f"{tuple(landmarks.shape)}")
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, H, T, T)
    block_scores = q @ landmarks.transpose(-1, -2) / math.sqrt(d)  # (B, H, T, n_blocks)
    return grouped_softmax_weights(scores, block_scores, block_size, top_k) @ v  # (B, H, T, d)
