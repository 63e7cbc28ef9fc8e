"""Retentive Network: retention, one token mixer with a parallel, a recurrent and a chunk-wise form.

Paper: Sun, Dong, Huang, Ma, Xia, Xue, Wang, Wei (2023), "Retentive Network: A Successor to Transformer for
Large Language Models", arXiv:2307.08621 — §2.1 (retention's parallel, recurrent and chunkwise recurrent
representations), §2.2 (gated multi-scale retention).
Implements, per head with decay γ (queries and keys already rotated by their positions, xPos-style):
  parallel    Retention(X) = (Q Kᵀ ⊙ D) V,   D_nm = γ^(n−m) for n ≥ m, else 0;
  recurrent   S_n = γ S_{n−1} + K_nᵀ V_n,   o_n = Q_n S_n   (a d × d state instead of a growing cache);
  chunk-wise  with chunks of B tokens, R_i = K_[i]ᵀ (V_[i] ⊙ ζ) + γ^B R_{i−1},  ζ_j = γ^(B−1−j),
              o_[i] = (Q_[i] K_[i]ᵀ ⊙ D) V_[i] + (Q_[i] R_{i−1}) ⊙ ξ,  ξ_j = γ^(j+1)
              (parallel inside a chunk, recurrent across chunks);
all three compute the same o_n = Σ_{m≤n} γ^(n−m) (q_n · k_m) v_m. Multi-scale retention gives head h its own
γ_h = 1 − 2^(−5−h) and combines the heads as  Y = W_O (swish(X W_G) ⊙ GroupNorm(head_1, …, head_h)).
Glossary: X (B, T, d_model) input · Q, K, V (B, h, T, d) per head · γ ``gammas`` (h,) · D decay mask · S, R
          state (B, h, d, d) · B ``chunk_size`` · ζ, ξ the decays inside a chunk · W_G, W_O gate and output
          projections · n, m query and key positions.
Left out / simplified: the rotation Θ is our LLaMA's RoPE (rotate-half pairs, base 10000) rather than xPos;
          values have the head size d (the paper doubles it); the paper's numerical normalisations (D's rows
          scaled, scores divided by their absolute sum) are omitted: each is a positive scale per (position,
          head), which the per-head GroupNorm removes up to its ε; the FFN and the rest of the RetNet block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effref.models.llama import apply_rope, rope_tables


def retention_gammas(n_heads: int) -> torch.Tensor:
    """γ_h = 1 − 2^(−5−h) for the h heads, (n_heads,): from a 32-token to a ~2^(4+h)-token memory."""
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"n_heads={n_heads!r} must be a positive integer")
    return 1 - 2.0 ** (-5 - torch.arange(n_heads, dtype=torch.float64))


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gammas: torch.Tensor) -> None:
    if q.ndim != 4 or q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need q, k (B, h, T, d) and "
                         "v (B, h, T, d_v)")
    if gammas.shape != (q.shape[1],) or not ((gammas > 0) & (gammas < 1)).all():
        raise ValueError(f"gammas must hold one decay in (0, 1) per head, shape ({q.shape[1]},); got "
                         f"{gammas.tolist()}; see retention_gammas")


def decay_mask(gammas: torch.Tensor, T: int) -> torch.Tensor:
    """D (h, T, T): γ^(n−m) where n ≥ m, 0 above the diagonal."""
    n = torch.arange(T, device=gammas.device)
    distance = (n[:, None] - n[None, :]).to(gammas.dtype)  # (T, T)
    return torch.where(distance >= 0, gammas[:, None, None] ** distance.clamp(min=0), 0.0)  # (h, T, T)


def retention_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """(Q Kᵀ ⊙ D) V for q, k (B, h, T, d), v (B, h, T, d_v); returns (B, h, T, d_v). Training form: O(T²)."""
    _check(q, k, v, gammas)
    D = decay_mask(gammas, q.shape[2]).to(q.dtype)  # (h, T, T)
    return (q @ k.transpose(-1, -2) * D) @ v  # (B, h, T, d_v)


def retention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gammas: torch.Tensor,
                        state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token at a time: S_n = γ S_{n−1} + k_nᵀ v_n, o_n = q_n S_n. Returns (outputs (B, h, T, d_v), the
    state S (B, h, d, d_v) after the last token); ``state`` continues an earlier call. Decoding form: O(1)/token."""
    _check(q, k, v, gammas)
    B, h, T, d = q.shape
    if state is None:
        state = q.new_zeros(B, h, d, v.shape[-1])  # (B, h, d, d_v)
    gamma = gammas.to(q.dtype)[None, :, None, None]  # (1, h, 1, 1)
    outputs = []
    for n in range(T):
        state = gamma * state + k[:, :, n, :, None] * v[:, :, n, None, :]  # (B, h, d, d_v): γ S + k_nᵀ v_n
        outputs.append(q[:, :, n, None, :] @ state)  # (B, h, 1, d_v)
    return torch.cat(outputs, dim=2), state


def retention_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gammas: torch.Tensor, chunk_size: int,
                        state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel inside chunks of ``chunk_size`` tokens, recurrent across them (the last chunk may be shorter).
    Returns (outputs (B, h, T, d_v), state R (B, h, d, d_v)), as ``retention_recurrent``."""
    _check(q, k, v, gammas)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer (e.g. 64)")
    B, h, T, d = q.shape
    if state is None:
        state = q.new_zeros(B, h, d, v.shape[-1])  # (B, h, d, d_v)
    gamma = gammas.to(q.dtype)[:, None]  # (h, 1)
    outputs = []
    for start in range(0, T, chunk_size):
        qc, kc, vc = (t[:, :, start:start + chunk_size] for t in (q, k, v))  # (B, h, b, ·)
        b = qc.shape[2]
        j = torch.arange(b, device=q.device, dtype=q.dtype)  # position inside the chunk
        inner = retention_parallel(qc, kc, vc, gammas)  # (B, h, b, d_v)
        cross = (qc @ state) * (gamma ** (j + 1))[None, :, :, None]  # (B, h, b, d_v): (Q R_{i−1}) ⊙ ξ
        outputs.append(inner + cross)
        zeta = (gamma ** (b - 1 - j))[None, :, :, None]  # (1, h, b, 1)
        state = kc.transpose(-1, -2) @ (vc * zeta) + (gamma ** b)[None, :, :, None] * state  # (B, h, d, d_v)
    return torch.cat(outputs, dim=2), state


class MultiScaleRetention(nn.Module):
    """Gated multi-scale retention (§2.2); ``forward`` runs any of the three forms on the same weights."""

    def __init__(self, d_model: int, n_heads: int, max_len: int = 4096, eps: float = 1e-5):
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model={d_model!r} must be a positive integer")
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1 or d_model % n_heads:
            raise ValueError(f"n_heads={n_heads!r} must be a positive divisor of d_model={d_model}")
        if (d_model // n_heads) % 2:
            raise ValueError(f"d_model / n_heads = {d_model // n_heads} must be even: the rotation turns pairs")
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.o_proj = (
            nn.Linear(d_model, d_model, bias=False) for _ in range(5))
        self.norm = nn.GroupNorm(n_heads, d_model, eps=eps)  # normalises each head's output separately
        self.register_buffer("gammas", retention_gammas(n_heads).float(), persistent=False)  # (h,)
        cos, sin = rope_tables(self.d_head, max_len, 10000.0)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_len, d_head)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, form: str = "parallel", chunk_size: int = 64,
                state: torch.Tensor | None = None, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Y (B, T, d_model) for X (B, T, d_model) at positions offset … offset + T − 1, and the state after it
        (None for ``form="parallel"``, which neither takes nor returns one)."""
        if form not in ("parallel", "recurrent", "chunkwise"):
            raise ValueError(f"form={form!r} must be 'parallel', 'recurrent' or 'chunkwise'")
        if form == "parallel" and (state is not None or offset):
            raise ValueError("form='parallel' starts at position 0 without a state; continue a sequence with "
                             "form='recurrent' or 'chunkwise'")
        B, T, d_model = x.shape
        if offset + T > self.rope_cos.shape[0]:
            raise ValueError(f"positions up to {offset + T} exceed max_len={self.rope_cos.shape[0]}")
        cos, sin = self.rope_cos[offset:offset + T], self.rope_sin[offset:offset + T]  # (T, d_head)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, h, T, d)

        q = apply_rope(heads(self.q_proj(x)), cos, sin)
        k = apply_rope(heads(self.k_proj(x)), cos, sin) * self.d_head ** -0.5  # the paper scales K by 1/√d
        v = heads(self.v_proj(x))
        if form == "parallel":
            y = retention_parallel(q, k, v, self.gammas)  # (B, h, T, d)
        elif form == "recurrent":
            y, state = retention_recurrent(q, k, v, self.gammas, state)
        else:
            y, state = retention_chunkwise(q, k, v, self.gammas, chunk_size, state)
        y = self.norm(y.transpose(1, 2).reshape(B * T, d_model)).view(B, T, d_model)  # GroupNorm per head
        return self.o_proj(F.silu(self.g_proj(x)) * y), state  # (B, T, d_model)
