"""Parallel Context Windows: a long context as several windows that re-use the same positions.

Paper: Ratner, Levine, Belinkov, Ram, Magar, Abend, Karpas, Shashua, Leyton-Brown, Shoham (2023), "Parallel
Context Windows for Large Language Models", ACL 2023, arXiv:2212.10947 — §2 (the method, Fig. 1).
Implements: the context is split into N windows of at most C tokens. Each window attends only to itself
(block-diagonal attention) and every window takes the positions 0 … C_w − 1, so no position exceeds C however
many windows there are. The task tokens (and everything generated after them) attend to all windows and to
themselves, at positions max_w C_w, max_w C_w + 1, …:
  context token i of window w:   attends to window w's tokens j ≤ i,   position p_i = i;
  task token t:                  attends to every context token and task tokens ≤ t,   position max C + t.
With our KV cache that is: encode each window on its own (its keys are rotated at its own positions), put the
N caches side by side, and continue from position max C (``ParallelContextCache``).
Glossary: N windows · C_w length of window w · C = max_w C_w · task tokens the prompt after the context.
Left out: the paper's choice of window sizes for in-context-learning demonstrations (we take the windows the
          caller gives), and models with learned absolute positions (ours rotate with RoPE).
"""

from __future__ import annotations

import torch

from effref.models.llama import KVCache, Llama, require_llama


class ParallelContextCache(KVCache):
    """Keys/values of N independently encoded windows side by side, then the task tokens; ``length`` is the
    position of the next token (max window length + task tokens so far), not the number of stored keys."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], next_position: int, max_new: int):
        B, H, n_context, d = keys[0].shape  # (B, H, Σ C_w, d_head) per layer
        self.k = [torch.cat([k, k.new_zeros(B, H, max_new, d)], dim=2) for k in keys]
        self.v = [torch.cat([v, v.new_zeros(B, H, max_new, d)], dim=2) for v in values]
        self.batch_size, self.max_len = B, n_context + max_new
        self.length, self.stored = next_position, n_context

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.stored, self.stored + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"{k.shape[2]} new tokens overflow the {self.max_len - self.stored} free slots; "
                             "build the cache with a larger max_new")
        self.k[layer][:, :, start:end] = k  # (B, H, T, d_head)
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, H, Σ C_w + task so far, d_head)

    def advance(self, n: int) -> None:
        self.length += n
        self.stored += n

    def truncate(self, length: int) -> None:
        raise NotImplementedError("a parallel-context cache does not roll back; build a new one")


def parallel_context_cache(model: Llama, windows: list[torch.Tensor], max_new: int) -> ParallelContextCache:
    """Encode each window (B, C_w) on its own at positions 0 … C_w − 1 and return the cache holding them all,
    with room for ``max_new`` task and generated tokens."""
    require_llama(model, "model")
    if not isinstance(windows, (list, tuple)) or not windows:
        raise ValueError("windows must be a non-empty list of (B, C_w) token-id tensors")
    if any(w.ndim != 2 or w.shape[1] < 1 or w.shape[0] != windows[0].shape[0] for w in windows):
        raise ValueError(f"every window must be (B, C_w) with the same B and C_w >= 1; got shapes "
                         f"{[tuple(w.shape) for w in windows]}")
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise ValueError(f"max_new={max_new!r} must be a positive integer: the task tokens plus those to generate")
    C = max(w.shape[1] for w in windows)
    if C + max_new > model.cfg.max_seq_len:
        raise ValueError(f"the longest window ({C}) + max_new={max_new} exceed max_seq_len={model.cfg.max_seq_len}; "
                         "use shorter windows (more of them cost no positions)")
    caches = []
    with torch.no_grad():
        for window in windows:
            cache = model.new_cache(window.shape[0], max_len=window.shape[1])
            model(window, cache)
            caches.append(cache)
    n_layers = model.cfg.n_layers
    keys = [torch.cat([c.k[layer][:, :, :c.length] for c in caches], dim=2) for layer in range(n_layers)]
    values = [torch.cat([c.v[layer][:, :, :c.length] for c in caches], dim=2) for layer in range(n_layers)]
    return ParallelContextCache(keys, values, next_position=C, max_new=max_new)


@torch.no_grad()
def pcw_logits(model: Llama, windows: list[torch.Tensor], task_ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab) of the task tokens (B, T) read after the parallel windows."""
    cache = parallel_context_cache(model, windows, max_new=task_ids.shape[1])
    return model(task_ids, cache)


@torch.no_grad()
def pcw_generate(model: Llama, windows: list[torch.Tensor], task_ids: torch.Tensor,
                 max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation (B, max_new_tokens) of the task tokens (B, T) after the parallel windows."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    cache = parallel_context_cache(model, windows, max_new=task_ids.shape[1] + max_new_tokens)
    logits, new = model(task_ids, cache)[:, -1], []
    for step in range(max_new_tokens):
        new.append(logits.argmax(-1))  # (B,)
        if step + 1 < max_new_tokens:
            logits = model(new[-1][:, None], cache)[:, -1]  # (B, vocab)
    return torch.stack(new, dim=1)  # (B, max_new_tokens)
