"""Measuring KV-cache policies: decode through a cache one token at a time, several policies side by side.

Eviction only matters in incremental decoding, so a policy's perplexity is measured by feeding the text one
token at a time through its cache and scoring every next-token prediction (disjoint windows, each from an
empty cache, every token but the first scored, as in ``effref.eval.perplexity``). The first ``prefill`` tokens
go in one pass, which is exact as long as prefill ≤ budget (nothing is evicted before the cache is full, and the
attention statistics a causal prefill produces are the per-token ones). Greedy generation through a cache gives
the quality of text produced under a budget.
``CacheStack`` makes this affordable on a CPU: it runs several caches side by side in one batch (batch block i
uses cache i), so all policies at one budget advance with one forward pass; they keep the same number of
entries, so their keys stack.
Glossary: W window · B windows (or prompts) per policy · budget entries kept per head.
Left out: sliding-window evaluation (stride < W) and sampling-based generation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from effref.models.llama import KVCache, Llama, require_llama
from effref.runtime import progress_bar


class CacheStack(KVCache):
    """Several caches along the batch: rows [offset_i, offset_i + batch_i) read and write cache i."""

    def __init__(self, caches: Sequence[KVCache]):  # no buffers of its own: the members hold them
        if not caches:
            raise ValueError("caches is empty; pass at least one cache")
        self.caches, self.sizes = list(caches), [c.batch_size for c in caches]
        self.batch_size, self.length, self.max_len = sum(self.sizes), 0, min(c.max_len for c in caches)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [c.update(layer, kk, vv) for c, kk, vv in zip(self.caches, k.split(self.sizes), v.split(self.sizes))]
        lengths = [keys.shape[2] for keys, _ in outs]
        if len(set(lengths)) > 1:
            raise ValueError(f"caches in a stack must return the same number of keys (same budget), got {lengths}")
        return torch.cat([keys for keys, _ in outs]), torch.cat([values for _, values in outs])  # (B, H, S, d)

    def advance(self, n: int) -> None:
        super().advance(n)
        for cache in self.caches:
            cache.advance(n)

    @property
    def wants_queries(self) -> bool:
        return any(getattr(c, "wants_queries", False) for c in self.caches)

    def receive_queries(self, layer: int, q: torch.Tensor) -> None:
        for cache, part in zip(self.caches, q.split(self.sizes)):
            if getattr(cache, "wants_queries", False):
                cache.receive_queries(layer, part)

    def truncate(self, length: int) -> None:
        raise NotImplementedError("a CacheStack of evicting caches cannot roll back")

    def reset(self) -> None:
        super().reset()
        for cache in self.caches:
            cache.reset()


@torch.no_grad()
def decode_nll(model: Llama, ids: torch.Tensor, cache: KVCache, prefill: int = 1,
               progress: bool = True) -> torch.Tensor:
    """Per-token NLL (B, W − 1) of ids (B, W), decoding through ``cache`` one token at a time after a
    ``prefill``-token first pass (exact for an evicting cache when prefill ≤ budget: nothing is evicted yet)."""
    require_llama(model, "model")
    if ids.ndim != 2 or not 1 <= prefill < ids.shape[1]:
        raise ValueError(f"ids {tuple(ids.shape)} and prefill={prefill}: need (B, W) and 1 <= prefill < W")
    logits = [model(ids[:, :prefill], cache)]  # (B, prefill, V)
    for t in progress_bar(range(prefill, ids.shape[1] - 1), desc="decode", leave=False, disable=not progress):
        logits.append(model(ids[:, t:t + 1], cache))  # (B, 1, V)
    logp = torch.cat(logits, dim=1).float().log_softmax(-1)  # (B, W − 1, V)
    return -logp.gather(-1, ids[:, 1:, None])[..., 0]  # (B, W − 1)


@torch.no_grad()
def decode_greedy(model: Llama, prompt: torch.Tensor, max_new_tokens: int, cache: KVCache,
                  progress: bool = True) -> torch.Tensor:
    """Greedy continuation (B, max_new_tokens) of prompt (B, T) through ``cache`` (which may evict)."""
    require_llama(model, "model")
    if prompt.ndim != 2 or max_new_tokens < 1:
        raise ValueError(f"prompt {tuple(prompt.shape)}, max_new_tokens={max_new_tokens}: need (B, T) and >= 1")
    token = model(prompt, cache)[:, -1].argmax(-1)  # (B,)
    out = [token]
    for _ in progress_bar(range(max_new_tokens - 1), desc="generate", leave=False, disable=not progress):
        token = model(token[:, None], cache)[:, -1].argmax(-1)
        out.append(token)
    return torch.stack(out, dim=1)  # (B, max_new_tokens)
