"""Linformer: project the keys and values along the sequence from length n down to k.

Paper: Wang, Li, Khabsa, Fang, Ma (2020), "Linformer: Self-Attention with Linear Complexity",
arXiv:2006.04768 — Section 4. Two fixed matrices E, F (k × n) shrink the sequence axis of the keys
and values before the softmax:

    head = softmax(Q (E K)ᵀ / √D) · (F V),      (T × k)(k × D): linear in T for a fixed k.

E and F are learned parameters of a given length n, so a Linformer has a maximum sequence length: a shorter
input uses the first T columns (as if zero-padded to n); a longer one is an error. The paper's Theorem 2
says good E, F exist (random projections scaled suitably); the paper also names mean or max pooling as a
projection.
``linformer_projection`` makes either kind: ``"random"`` N(0, 1/k) entries (the paper's initialisation),
or ``"mean"``, the average over k consecutive segments, which with k = n is the identity (exact attention).
Glossary: n ``max_len`` · k ``rank`` · E ``proj_k`` · F ``proj_v``.
Left out: sharing E = F across heads and layers (pass the same tensor), and learning them (a caller makes
them ``nn.Parameter``s). Bidirectional only: each projected key mixes all positions, so ``causal=True`` raises.
"""

from __future__ import annotations

import math

import torch

from effref.attention.interface import check_qkv, expand_kv, positive_int

KINDS = ("random", "mean")


def linformer_projection(max_len: int, rank: int, kind: str = "random",
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """A (rank, max_len) projection: Gaussian N(0, 1/rank) (``"random"``) or segment means (``"mean"``)."""
    positive_int("max_len", max_len, "use the longest sequence the projection must accept")
    positive_int("rank", rank, "use the projected length k, e.g. 64")
    if rank > max_len:
        raise ValueError(f"rank={rank} exceeds max_len={max_len}; a projection cannot lengthen the sequence")
    if kind == "random":
        return torch.randn(rank, max_len, generator=generator) / math.sqrt(rank)
    if kind == "mean":
        proj = torch.zeros(rank, max_len)
        for row, segment in enumerate(torch.tensor_split(torch.arange(max_len), rank)):
            proj[row, segment] = 1 / len(segment)
        return proj
    raise ValueError(f"kind={kind!r} is not one of {KINDS}")


def linformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        proj_k: torch.Tensor, proj_v: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q (E K)ᵀ / √D) (F V) with E = ``proj_k`` and F = ``proj_v`` (default: E), both (k, n)."""
    group = check_qkv(q, k, v, causal)
    proj_v = proj_k if proj_v is None else proj_v
    for name, proj in (("proj_k", proj_k), ("proj_v", proj_v)):
        if not isinstance(proj, torch.Tensor) or proj.dim() != 2:
            raise ValueError(f"{name} must be a (rank, max_len) tensor; make one with linformer_projection")
    if proj_k.shape != proj_v.shape:
        raise ValueError(f"proj_k.shape={tuple(proj_k.shape)} and proj_v.shape={tuple(proj_v.shape)} must match")
    if causal:
        raise ValueError("linformer_attention cannot be causal: each projected key mixes every position, the "
                         "future included; use it bidirectionally (causal=False), or pick a causal method such "
                         "as linear_attention")
    T, max_len = k.shape[2], proj_k.shape[1]
    if T > max_len:
        raise ValueError(f"the sequence has {T} tokens but the projection was made for max_len={max_len}; "
                         f"make a longer one with linformer_projection({T}, rank) or cut the input")
    k, v = expand_kv(k, group), expand_kv(v, group)  # (B, H, T, D)
    e, f = proj_k[:, :T].to(k), proj_v[:, :T].to(v)  # (k, T): the first T columns = zero-padding to n
    k_short, v_short = e @ k, f @ v  # (B, H, k, D)
    scores = q @ k_short.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, k)
    return torch.softmax(scores, dim=-1) @ v_short  # (B, H, T, D)
