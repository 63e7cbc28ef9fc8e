"""ALiBi: attention with linear biases instead of position embeddings.

Paper: Press, Smith, Lewis (2022), "Train Short, Test Long: Attention with Linear Biases Enables Input Length
Extrapolation", ICLR 2022, arXiv:2108.12409 — §3 (the bias and the head slopes).
Implements: no rotation and no position embedding; head h adds a penalty linear in the distance to its scores,
  softmax(q_i kᵀ / √d + m_h · [−(i − 1), …, −2, −1, 0])  (§3; future keys masked),
with geometric slopes m_h = 2^(−8h/H), h = 1..H (H = 8: 1/2, 1/4, …, 1/256). When H is not a power of two,
the paper's code takes the 2^⌊log₂ H⌋ slopes of that power of two, then every other slope of the next power of
two (2^(−4h/2^⌊log₂ H⌋), odd h) until there are H.
``use_alibi`` turns our Llama into an ALiBi model (train it from scratch: a RoPE-trained model does not know
the bias).
Glossary: H n_heads (query heads; with grouped keys, every query head has its own slope) · m_h slope of head h
          · i query position · j key position · T new queries, the last T of S keys.
Left out: the fused bias inside FlashAttention-style kernels (we materialise the (H, T, S) bias), and the
          bidirectional (encoder) form.
"""

from __future__ import annotations

import math

import torch

from effref.longcontext.positions import PositionalAttention, causal_positions, install_rope_tables, swap_attention
from effref.models.llama import Llama, require_llama


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The slope m_h of every head, (n_heads,), by the paper's rule (see the module docstring)."""
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads <= 0:
        raise ValueError(f"n_heads={n_heads!r} must be a positive integer, the model's number of query heads")

    def power_of_two(n: int) -> list[float]:  # 2^(−8/n), 2^(−16/n), …, 2^(−8)
        return [2 ** (-8 * h / n) for h in range(1, n + 1)]

    closest = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][:n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)  # (n_heads,)


def alibi_bias(n_heads: int, T: int, S: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """The additive bias (n_heads, T, S) for T queries that are the last T of S keys (S = T by default):
    −m_h · (i − j) on keys j ≤ i, −inf on future keys."""
    S = T if S is None else S
    if T < 1 or S < T:
        raise ValueError(f"T={T}, S={S}: need 1 <= T <= S (the queries are the last T of the S keys)")
    distance = causal_positions(T, S, device).float()  # (T, S): i − j
    bias = -alibi_slopes(n_heads).to(device)[:, None, None] * distance  # (n_heads, T, S)
    return bias.masked_fill(distance < 0, float("-inf"))


class ALiBiAttention(PositionalAttention):
    """LLaMA attention with ALiBi: queries and keys are not rotated; the bias carries all position information."""

    def rotate(self, q, k, cos, sin, offset):
        return q, k  # no position embedding at all

    def bias(self, T: int, S: int, device: torch.device) -> torch.Tensor:
        return alibi_bias(self.n_heads, T, S, device)  # (n_heads, T, S)


def use_alibi(model: Llama, max_len: int | None = None) -> Llama:
    """Make ``model`` (in place) an ALiBi model for inputs of up to ``max_len`` tokens (default: unchanged);
    returns it. Meant for a model about to be trained: it keeps the weights, but a RoPE-trained model has not
    learned to read the bias."""
    require_llama(model, "model")
    max_len = model.cfg.max_seq_len if max_len is None else max_len
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len={max_len!r} must be a positive integer: the longest input, in tokens")
    swap_attention(model, ALiBiAttention)
    d_head = model.cfg.d_head
    # identity tables (cos 1, sin 0): nothing in the model rotates, and the context length becomes max_len
    return install_rope_tables(model, torch.ones(max_len, d_head), torch.zeros(max_len, d_head))
