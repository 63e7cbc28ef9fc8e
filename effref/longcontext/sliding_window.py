"""Sliding-window attention with a rolling KV cache, as in Mistral 7B.

Paper: Jiang, Sablayrolles, Mensch, Bamford, Chaplot, de las Casas, Bressand, Lengyel, Lample, Saulnier, Lavaud,
Lachaux, Stock, Le Scao, Lavril, Wang, Lacroix, El Sayed (2023), "Mistral 7B", arXiv:2310.06825 — §2
("Sliding Window Attention", "Rolling Buffer Cache", "Pre-fill and Chunking"); the band pattern goes back to
Beltagy, Peters, Cohan (2020), "Longformer", arXiv:2004.05150.
Implements: the token at position i attends to the W positions i − W + 1 … i (itself included):
  SWA(q_i) = Σ_{i−W < j ≤ i} softmax_j(q_i·k_j / √d) v_j,
so one layer sees W tokens back and k stacked layers up to k·(W − 1) (the paper's "W × k" receptive field).
Optionally the first s positions stay visible to every query (``sinks``): StreamingLLM's attention sinks
(Xiao et al. 2024, arXiv:2309.17453) written as a mask, so a whole stream is scored in one pass; decoding with
sinks is ``effref.inference.kv_policies.StreamingCache`` (a budget of B keys = ``sinks`` s + ``window`` B − s + 1).
The cache is Mistral's rolling buffer: W slots per layer, position p kept in slot p mod W, so memory stays
W tokens however long the stream; a chunk of T new tokens reads the W − 1 newest stored ones (the only past
keys any of them can see) before it overwrites their slots.
  ``sliding_window_mask`` / ``sliding_window_attention``  the band on raw tensors (grouped heads allowed);
  ``SlidingWindowAttention`` / ``use_sliding_window``     the band inside our Llama (a full pass or a chunked
                                                          prefill sees exactly the window);
  ``SlidingWindowCache``                                  the rolling buffer, a ``KVCache`` our Llama uses.
Glossary: W ``window`` · s ``sinks`` · i query position · j key position · T new tokens · S keys attended to
          (stored + new; the new ones last) · slot p mod W of position p.
Left out: Mistral's fused kernels (xFormers block-diagonal masks), the positions limit (our RoPE tables still
          bound a stream to ``max_seq_len``; StreamingLLM in effref/inference/kv_policies.py re-uses a window
          too, but keeps the first tokens as attention sinks), and batches of unequal lengths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effref.longcontext.positions import PositionalAttention, causal_positions, swap_attention
from effref.models.llama import KVCache, Llama, require_llama


def _check_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} must be a positive integer: the number of positions each token "
                         "attends to, itself included (Mistral 7B: 4096)")


def sliding_window_mask(T: int, S: int, window: int, device: torch.device | None = None,
                        sinks: int = 0) -> torch.Tensor:
    """(T, S) bool, True where query t (the t-th of the last T of S positions 0 … S − 1) may see key j:
    0 ≤ i − j < W, or j < ``sinks`` (and j ≤ i)."""
    _check_window(window)
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks={sinks!r} must be an integer >= 0: the first positions every query keeps seeing")
    distance = causal_positions(T, S, device)  # (T, S) query position − key position
    is_sink = torch.arange(S, device=device)[None, :] < sinks  # (1, S)
    return (distance >= 0) & ((distance < window) | is_sink)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             sinks: int = 0) -> torch.Tensor:
    """Band attention (plus ``sinks`` first keys): queries (B, n_heads, T, d) are the last T of the S keys/values
    (B, n_kv_heads, S, d); each query head group of n_heads / n_kv_heads shares one key/value head.
    Returns (B, n_heads, T, d)."""
    _check_window(window)
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[-1] != k.shape[-1] or q.shape[2] > k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need q (B, n_heads, T, d) "
                         "and k, v (B, n_kv_heads, S, d) with T <= S")
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}; each key/value head "
                         "must serve a whole group of query heads")
    k = k.repeat_interleave(n_heads // n_kv_heads, dim=1)  # (B, n_heads, S, d)
    v = v.repeat_interleave(n_heads // n_kv_heads, dim=1)  # (B, n_heads, S, d)
    mask = sliding_window_mask(q.shape[2], k.shape[2], window, q.device, sinks)  # (T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, n_heads, T, d)


class SlidingWindowAttention(PositionalAttention):
    """LLaMA attention restricted to the last ``window`` positions and the first ``sinks`` (RoPE as before)."""

    def __init__(self, cfg, layer: int, window: int, sinks: int = 0):
        sliding_window_mask(1, 1, window, sinks=sinks)  # checks both
        super().__init__(cfg, layer)
        self.window, self.sinks = window, sinks

    def bias(self, T: int, S: int, device: torch.device) -> torch.Tensor:
        visible = sliding_window_mask(T, S, self.window, device, self.sinks)  # (T, S)
        return torch.zeros(T, S, device=device).masked_fill(~visible, float("-inf"))[None]  # (1, T, S)


def use_sliding_window(model: Llama, window: int, sinks: int = 0) -> Llama:
    """Make every attention layer of ``model`` (in place, same weights) attend to the last ``window`` positions
    (and the first ``sinks``); returns the model. Decode it with ``SlidingWindowCache.for_model(model)`` to keep
    only W tokens per layer (without sinks), or with a full ``KVCache`` (the mask then holds for any sinks);
    ``swap_attention(model, PositionalAttention)`` makes it a plain model again."""
    require_llama(model, "model")
    sliding_window_mask(1, 1, window, sinks=sinks)  # checks both
    return swap_attention(model, SlidingWindowAttention, window=window, sinks=sinks)


class SlidingWindowCache(KVCache):
    """Mistral's rolling buffer: ``window`` slots per layer; position p lives in slot p mod W."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, d_head: int, window: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        _check_window(window)
        super().__init__(n_layers, batch_size, n_kv_heads, d_head, window, dtype, device)
        self.window = window

    @classmethod
    def for_model(cls, model: Llama, batch_size: int = 1, window: int | None = None) -> SlidingWindowCache:
        """A cache shaped for ``model``; ``window`` defaults to that of its ``SlidingWindowAttention`` layers."""
        require_llama(model, "model")
        if any(getattr(block.attn, "sinks", 0) for block in model.blocks):
            raise ValueError("the model keeps attention sinks, which a rolling buffer drops; decode it with "
                             "effref.inference.kv_policies.StreamingCache (or a full KVCache)")
        windows = {getattr(block.attn, "window", None) for block in model.blocks}
        if window is None:
            if len(windows) != 1 or None in windows:
                raise ValueError("the model has no single sliding window (use_sliding_window(model, window) "
                                 "first), so pass window= explicitly")
            window = windows.pop()
        w = model.embed.weight
        return cls(model.cfg.n_layers, batch_size, model.cfg.n_kv_heads, model.cfg.d_head, window, dtype=w.dtype,
                   device=w.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T, W, start = k.shape[2], self.window, self.length
        n_past = min(start, W - 1)  # the newest W − 1 stored positions are all any new query can see
        past_slots = torch.arange(start - n_past, start, device=k.device) % W  # oldest first
        keys = torch.cat([self.k[layer][:, :, past_slots], k], dim=2)  # (B, H, n_past + T, d_head)
        values = torch.cat([self.v[layer][:, :, past_slots], v], dim=2)
        kept = min(T, W)  # of the new tokens, only the last W can still be needed later
        new_slots = torch.arange(start + T - kept, start + T, device=k.device) % W
        self.k[layer][:, :, new_slots] = k[:, :, T - kept:]  # (B, H, kept, d_head) overwrites the oldest slots
        self.v[layer][:, :, new_slots] = v[:, :, T - kept:]
        return keys, values

    def truncate(self, length: int) -> None:
        raise NotImplementedError(f"a rolling buffer has overwritten old slots and cannot roll back to "
                                  f"length={length}; speculative decoding needs the dense KVCache")
