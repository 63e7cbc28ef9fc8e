"""Reformer's LSH attention: hash shared query-keys into buckets, sort, and attend within chunks.

Paper: Kitaev, Kaiser, Levskaya (2020), "Reformer: The Efficient Transformer", arXiv:2001.04451 —
Section 2 (shared-QK attention, angular LSH, chunking; its Figure 2).
Queries and keys share one projection; the keys are the unit-normalised queries, k_j = q_j / ‖q_j‖, and a
token does not attend to itself unless nothing else is visible (its own score q·q/‖q‖ would dominate).
Angular LSH with a random matrix R (D × b/2): h(x) = argmax([xR ; −xR]), so nearby directions tend to share
a bucket. Sorting the tokens by (bucket, position) puts each bucket's members next to each other; the sorted
sequence is cut into chunks of c tokens and every token attends to its own chunk and the one before, a
fixed (c × 2c) block per chunk instead of a T × T matrix:

    out_i = Σ_{j ∈ P_i} softmax_j(q_i·k_j / √D − 10⁵·[j = i]) v_j,   P_i = chunk(i) ∪ chunk(i) − 1 (sorted order).

With a chunk as long as the sequence, P_i is every key and the result is shared-QK softmax attention
(``shared_qk_attention``), the exact limit the approximation is measured against.
Glossary: b ``n_buckets`` · c ``chunk_size`` · R random rotation · P_i keys visible to token i.
Causal caveat: token i sums only keys j ≤ i, but which of them share its chunk depends on where the later
tokens sort, i.e. on their buckets: a small leak of information from the future that sorting the whole
sequence brings (tests/attention/test_exact.py shows it).
Left out: several hash rounds (n_rounds > 1, with the paper's correction for keys seen twice), reversible
layers and chunked feed-forward. Simplified: keys of another bucket that fall in the same or previous chunk
are attended to as well (the paper masks them only implicitly, by sorting).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from effref.attention.interface import check_qkv, positive_int

SELF_PENALTY = 1e5  # the paper's large negative score for attending to oneself


def lsh_buckets(x: torch.Tensor, n_buckets: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Angular LSH of x (B, H, T, D): h(x) = argmax([xR ; −xR]) with one Gaussian R (D, b/2) per head."""
    if isinstance(n_buckets, bool) or not isinstance(n_buckets, int) or n_buckets < 2 or n_buckets % 2:
        raise ValueError(f"n_buckets={n_buckets!r} must be an even integer ≥ 2 (h(x) picks among xR and −xR)")
    rotation = torch.randn(x.shape[1], x.shape[-1], n_buckets // 2, generator=generator).to(x)  # (H, D, b/2)
    rotated = torch.einsum("bhtd,hdr->bhtr", x, rotation)  # (B, H, T, b/2)
    return torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)  # (B, H, T)


def shared_qk_attention(q: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    """Full shared-QK softmax attention (keys = unit queries, self penalised): what LSH attention approximates."""
    check_qkv(q, None, v, causal)
    keys = F.normalize(q, dim=-1)  # (B, H, T, D)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    T = q.shape[2]
    scores = scores - SELF_PENALTY * torch.eye(T, device=q.device, dtype=q.dtype)
    if causal:
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (B, H, T, D)


def reformer_attention(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor, *, causal: bool = False,
                       n_buckets: int = 8, chunk_size: int = 32, seed: int = 0) -> torch.Tensor:
    """LSH attention with shared QK: ``k`` must be None or ``q`` itself (the keys are the unit queries)."""
    if k is not None and k is not q:
        raise ValueError("reformer_attention shares queries and keys: pass k=None or k=q (in a model, "
                         "use_attention(..., shared_qk=True))")
    check_qkv(q, None, v, causal)
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v.shape={tuple(v.shape)} must have q's batch, heads and length {tuple(q.shape[:3])}")
    positive_int("chunk_size", chunk_size, "use the tokens per chunk c, e.g. 32")
    B, H, T, D = q.shape
    buckets = lsh_buckets(q, n_buckets, torch.Generator().manual_seed(seed))  # (B, H, T)
    positions = torch.arange(T, device=q.device)
    order = (buckets * T + positions).argsort(dim=-1)  # (B, H, T) sort by bucket, then by position
    n_chunks = -(-T // chunk_size)
    pad = n_chunks * chunk_size - T
    order = F.pad(order, (0, pad), value=-1)  # (B, H, n·c); −1 marks padding
    pos = order.view(B, H, n_chunks, chunk_size)  # (B, H, n, c) original position of each sorted slot
    pos_near = torch.cat([pos.roll(1, dims=2), pos], dim=-1)  # (B, H, n, 2c) previous chunk, then own
    pos_near[:, :, 0, :chunk_size] = -1  # the first chunk has no previous chunk

    def gather(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:  # x (B, H, T, D) at positions at (B, H, ...)
        flat = at.clamp(min=0).flatten(2)  # (B, H, L)
        return x.gather(2, flat[..., None].expand(-1, -1, -1, x.shape[-1])).view(*at.shape, x.shape[-1])

    q_chunk = gather(q, pos)  # (B, H, n, c, D)
    k_near = gather(F.normalize(q, dim=-1), pos_near)  # (B, H, n, 2c, D)
    v_near = gather(v, pos_near)  # (B, H, n, 2c, D)
    scores = torch.einsum("bhncd,bhnkd->bhnck", q_chunk, k_near) / math.sqrt(D)  # (B, H, n, c, 2c)
    query_pos, key_pos = pos[..., :, None], pos_near[..., None, :]  # (B, H, n, c, 1), (B, H, n, 1, 2c)
    scores = scores - SELF_PENALTY * (query_pos == key_pos)
    hidden = (key_pos < 0) | (key_pos > query_pos if causal else False)  # padding, and the future when causal
    hidden = hidden & (query_pos >= 0)  # padding queries see everything: no all-masked row, no NaN gradient
    weights = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
    out_sorted = torch.einsum("bhnck,bhnkd->bhncd", weights, v_near).reshape(B, H, n_chunks * chunk_size, D)
    out = torch.empty_like(q)  # (B, H, T, D)
    real = order[..., :T]  # the first T sorted slots are real tokens; padding sits at the end
    out.scatter_(2, real[..., None].expand(-1, -1, -1, D), out_sorted[:, :, :T])
    return out
