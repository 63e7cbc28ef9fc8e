"""kNN-augmented attention over an external memory, as in Memorizing Transformers.

Paper: Wu, Rabe, Hutchins, Szegedy (2022), "Memorizing Transformers", ICLR 2022, arXiv:2203.08913 — §3 (the
kNN-augmented attention layer, the external memory, the gate).
Implements: the keys and values of past segments go into a memory of at most M (key, value) pairs per head,
oldest out first. Each query q of the current segment retrieves its k nearest keys by inner product and attends
to them alone, V_m = Σ_{i ∈ top-k} softmax_i(q·k_i/√d) v_i, beside the ordinary causal attention over the current
segment, V_c; a learned scalar gate per head mixes the two:
  V_a = σ(b_g) · V_m + (1 − σ(b_g)) · V_c.
The search is exact: one matrix product of the queries with all stored keys and a top-k.
Glossary: M ``capacity`` · k ``top_k`` · b_g ``gate`` (one logit per head) · V_m memory output · V_c local output ·
          d head size.
Left out: approximate search (the paper uses an approximate kNN index; exact search is the reference it
          approximates), positions for the retrieved keys (none here), and training the gate and the rest
          of a model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


class KNNMemory:
    """At most ``capacity`` (key, value) pairs per (sequence, head), first in first out."""

    def __init__(self, batch_size: int, n_heads: int, d_head: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        for name, value in (("batch_size", batch_size), ("n_heads", n_heads), ("d_head", d_head),
                            ("capacity", capacity)):
            _check_positive(name, value)
        self.capacity = capacity
        self.keys = torch.zeros(batch_size, n_heads, 0, d_head, dtype=dtype, device=device)  # (B, H, n, d)
        self.values = torch.zeros_like(self.keys)

    def __len__(self) -> int:
        return self.keys.shape[2]

    def add(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys and values (B, H, T, d); beyond ``capacity`` the oldest pairs go."""
        if k.shape != v.shape or k.shape[:2] != self.keys.shape[:2] or k.shape[3] != self.keys.shape[3]:
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be (B, H, T, d) = "
                             f"({self.keys.shape[0]}, {self.keys.shape[1]}, T, {self.keys.shape[3]})")
        self.keys = torch.cat([self.keys, k.to(self.keys.dtype)], dim=2)[:, :, -self.capacity:]
        self.values = torch.cat([self.values, v.to(self.values.dtype)], dim=2)[:, :, -self.capacity:]

    def search(self, q: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact inner-product kNN: scores and indices (B, H, T, k) of the k best stored keys for every query
        (B, H, T, d), best first; k = min(top_k, stored pairs)."""
        _check_positive("top_k", top_k)
        if len(self) == 0:
            raise ValueError("the memory is empty; add keys and values first")
        scores = q @ self.keys.transpose(-1, -2)  # (B, H, T, n) every stored key
        return scores.topk(min(top_k, len(self)), dim=-1)

    def retrieve(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values (B, H, T, k, d) at ``indices`` (B, H, T, k)."""
        B, H, T, k = indices.shape
        flat = indices.reshape(B, H, T * k, 1).expand(-1, -1, -1, self.keys.shape[3])  # (B, H, T·k, d)
        return (self.keys.gather(2, flat).view(B, H, T, k, -1), self.values.gather(2, flat).view(B, H, T, k, -1))


def knn_attention(q: torch.Tensor, memory: KNNMemory, top_k: int) -> torch.Tensor:
    """V_m (B, H, T, d): each query attends to its ``top_k`` nearest memory keys only."""
    _, indices = memory.search(q, top_k)  # (B, H, T, k)
    keys, values = memory.retrieve(indices)  # (B, H, T, k, d)
    scores = (q[:, :, :, None, :] * keys).sum(-1) / math.sqrt(q.shape[-1])  # (B, H, T, k)
    return (scores.softmax(-1)[..., None] * values).sum(-2)  # (B, H, T, d)


def knn_augmented_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, memory: KNNMemory, top_k: int,
                            gate: torch.Tensor) -> torch.Tensor:
    """σ(gate) · V_m + (1 − σ(gate)) · V_c for one segment's q, k, v (B, H, T, d) and ``gate`` logits (H,);
    with an empty memory (the first segment) the output is the local attention alone. The segment's own keys
    and values are not added to the memory: call ``memory.add(k, v)`` after it, as the layer does."""
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must all be (B, H, T, d)")
    if gate.shape != (q.shape[1],):
        raise ValueError(f"gate must hold one logit per head, shape ({q.shape[1]},), got {tuple(gate.shape)}")
    _check_positive("top_k", top_k)
    local = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, d) V_c
    if len(memory) == 0:
        return local
    g = torch.sigmoid(gate).to(q.dtype)[None, :, None, None]  # (1, H, 1, 1)
    return g * knn_attention(q, memory, top_k) + (1 - g) * local
