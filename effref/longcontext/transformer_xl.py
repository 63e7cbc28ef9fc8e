"""Transformer-XL: segment-level recurrence with a memory of hidden states, and relative position encodings.

Paper: Dai, Yang, Yang, Carbonell, Le, Salakhutdinov (2019), "Transformer-XL: Attentive Language Models Beyond a
Fixed-Length Context", ACL 2019, arXiv:1901.02860 — §3.2 (segment-level recurrence), §3.3 (relative positional
encodings, the A^rel score), §3.4 (the layer's equations).
Implements: a long text is read in segments of T tokens. Layer n of segment τ + 1 attends to its own segment
and to the last M hidden states of layer n − 1 from earlier segments, kept without gradient:
  h̃ = [SG(m^{n−1}) ∘ h^{n−1}_{τ+1}],  q = h^{n−1}_{τ+1} W_q,  k = h̃ W_{k,E},  v = h̃ W_v,
so the context grows by M per layer without recomputing it. Positions are relative: the score of query i with
key j (distance i − j, R a fixed sinusoid table) is
  A^rel_ij = q_iᵀ k_j  (a) + q_iᵀ W_{k,R} R_{i−j}  (b) + uᵀ k_j  (c) + vᵀ W_{k,R} R_{i−j}  (d),
with u, v learned per head, so the same weights serve every segment whatever its absolute position.
Glossary: T segment length · M ``mem_len`` · m^n memory of layer n (B, M, d_model) · h̃ memory ∘ segment
          (B, M + T, d_model) · R sinusoid of the distance (M + T, d_model) · W_{k,R} ``r_proj`` · u, v
          ``u_bias``, ``v_bias`` (n_heads, d_head) · SG stop-gradient (``detach``).
Simplified: pre-norm blocks (the paper uses post-norm), and a gather instead of the paper's "relative shift"
            trick for terms (b) and (d) (the same numbers, read more directly); left out: adaptive softmax and
            adaptive embeddings, dropout.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoid(distances: torch.Tensor, d_model: int) -> torch.Tensor:
    """R (len, d_model): [sin(p / 10000^(2k/d)), cos(p / 10000^(2k/d))] for each distance p."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d_model, 2, dtype=torch.float32, device=distances.device) / d_model)
    angles = distances.float()[:, None] * inv_freq[None, :]  # (len, d_model/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (len, d_model)


class RelativeAttention(nn.Module):
    """Multi-head attention over [memory ∘ segment] with Transformer-XL's relative score A^rel."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1 or d_model % n_heads:
            raise ValueError(f"n_heads={n_heads!r} must be a positive divisor of d_model={d_model}")
        if d_model % 2:
            raise ValueError(f"d_model={d_model} must be even: the sinusoid table pairs sin and cos")
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.q_proj, self.k_proj, self.v_proj, self.r_proj, self.o_proj = (
            nn.Linear(d_model, d_model, bias=False) for _ in range(5))
        self.u_bias = nn.Parameter(torch.zeros(n_heads, self.d_head))  # u: content bias, term (c)
        self.v_bias = nn.Parameter(torch.zeros(n_heads, self.d_head))  # v: position bias, term (d)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d_model) the segment, memory (B, M, d_model) or None; returns (B, T, d_model)."""
        B, T, d_model = x.shape
        h = x if memory is None else torch.cat([memory, x], dim=1)  # (B, S, d_model), S = M + T
        S, M = h.shape[1], h.shape[1] - T
        q = self.q_proj(x).view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, d_head)
        k = self.k_proj(h).view(B, S, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, S, d_head)
        v = self.v_proj(h).view(B, S, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, S, d_head)
        distances = torch.arange(S - 1, -1, -1, device=x.device)  # column c holds distance S − 1 − c
        r = self.r_proj(sinusoid(distances, d_model).to(x.dtype)).view(S, self.n_heads, self.d_head)  # W_{k,R} R
        content = (q + self.u_bias[:, None]) @ k.transpose(-1, -2)  # (B, H, T, S): terms (a) + (c)
        position = (q + self.v_bias[:, None]) @ r.permute(1, 2, 0)  # (B, H, T, S) by distance column
        i = torch.arange(T, device=x.device)[:, None]
        j = torch.arange(S, device=x.device)[None, :]
        column = (T - 1 - i + j).clamp(0, S - 1)  # (T, S): distance M + i − j sits in column T − 1 − i + j
        position = position.gather(-1, column.expand(B, self.n_heads, T, S))  # terms (b) + (d) at i − j
        scores = (content + position) / math.sqrt(self.d_head)
        scores = scores.masked_fill(j > M + i, float("-inf"))  # causal: query i is at position M + i of h̃
        y = scores.softmax(-1) @ v  # (B, H, T, d_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, d_model))


class XLBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int):
        super().__init__()
        self.attn_norm, self.attn = nn.LayerNorm(d_model), RelativeAttention(d_model, n_heads)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        memory = None if memory is None else self.attn_norm(memory)
        x = x + self.attn(self.attn_norm(x), memory)  # (B, T, d_model)
        return x + self.mlp(self.mlp_norm(x))


class TransformerXL(nn.Module):
    """A Transformer-XL language model: ``forward(ids, mems)`` reads one segment and returns the next memories."""

    def __init__(self, vocab_size: int, d_model: int, n_heads: int, n_layers: int, d_ff: int, mem_len: int):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers),
                            ("d_ff", d_ff), ("mem_len", mem_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        self.mem_len = mem_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(XLBlock(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.norm, self.lm_head = nn.LayerNorm(d_model), nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, ids: torch.Tensor,
                mems: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (B, T, vocab) of a segment (B, T) after the memories ``mems`` (one (B, M, d_model) per layer,
        or None at the start), and the memories for the next segment: the last ``mem_len`` inputs of every
        layer, detached (SG)."""
        if ids.ndim != 2:
            raise ValueError(f"ids must be (B, T), got {tuple(ids.shape)}")
        if mems is not None and (len(mems) != len(self.blocks) or any(m.shape[0] != ids.shape[0] for m in mems)):
            raise ValueError(f"mems must hold one (B={ids.shape[0]}, M, d_model) tensor per layer "
                             f"({len(self.blocks)}); pass the list the previous call returned, or None")
        x = self.embed(ids)  # (B, T, d_model)
        new_mems = []
        for n, block in enumerate(self.blocks):
            memory = None if mems is None else mems[n]
            seen = x if memory is None else torch.cat([memory, x], dim=1)  # (B, M + T, d_model)
            new_mems.append(seen[:, -self.mem_len:].detach())  # SG: no gradient into earlier segments
            x = block(x, memory)
        return self.lm_head(self.norm(x)), new_mems
