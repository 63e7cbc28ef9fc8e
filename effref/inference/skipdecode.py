"""SkipDecode: token-level early exit that keeps batching and the KV cache working.

Paper: Del Corro, Del Giorno, Agarwal, Yu, Awadallah, Mukherjee (2023), "SkipDecode: Autoregressive Skip
Decoding with Batching and Caching for Efficient LLM Inference", arXiv:2307.02628 — §3 (one exit point per
sequence position, monotonically decreasing exit points, skipping the lower layers).
Implements: decoding step j (the j-th generated token is fed back) runs L(j) of the L blocks, the same for every
sequence of the batch, with
  L(j) = round(L_max − (L_max − L_min) · j / (n − 1)),  j = 0 … n − 1,
a linear decay over the n decoding steps. ``skip="lower"`` skips the lowest L − L(j) blocks (the paper's
choice: the top blocks, which shape the output distribution, always run, and the token embedding goes straight
into the first block that runs); ``skip="upper"`` skips the highest ones instead (classic early exit: the final
norm and LM head read an intermediate layer). Because L(j) never grows, every block a token runs was run by
every earlier token as well, so the keys/values it attends to exist: ``SkipCache`` keeps one fill level per
layer (a skipped layer stores nothing for that token) and nothing is ever recomputed.
Glossary: L ``n_layers`` · L(j) blocks run at decoding step j · L_max / L_min ``max_layers`` / ``min_layers``
          · n decoding steps in the schedule · P prompt length.
Left out: the paper's training of the model with the skip schedule (without it the quality drop is large; the
          chapter measures it), and per-sequence schedules for prompts of different lengths (left padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effref.inference.decoding import forward_tokens
from effref.models.llama import KVCache, Llama, require_llama
from effref.runtime import progress_bar

SKIPS = ("lower", "upper")


@dataclass(frozen=True)
class SkipDecodeConfig:
    max_layers: int  # L_max, blocks run at the first decoding step
    min_layers: int  # L_min, blocks run at the last
    skip: str = "lower"  # which blocks are skipped: "lower" (SkipDecode) or "upper" (early exit)

    def __post_init__(self) -> None:
        if not 1 <= self.min_layers <= self.max_layers:
            raise ValueError(f"min_layers={self.min_layers}, max_layers={self.max_layers}: need "
                             "1 <= min_layers <= max_layers (the exit point may only move down)")
        if self.skip not in SKIPS:
            raise ValueError(f"skip={self.skip!r} is not known; use one of {SKIPS}")


def exit_schedule(n_steps: int, config: SkipDecodeConfig, n_layers: int) -> list[int]:
    """L(j) for j = 0 … n_steps − 1: a linear decay from max_layers to min_layers (non-increasing)."""
    if config.max_layers > n_layers:
        raise ValueError(f"max_layers={config.max_layers} exceeds the model's n_layers={n_layers}")
    span = config.max_layers - config.min_layers
    return [round(config.max_layers - span * j / max(n_steps - 1, 1)) for j in range(n_steps)]


def layers_to_run(count: int, n_layers: int, skip: str) -> range:
    return range(n_layers - count, n_layers) if skip == "lower" else range(count)


class SkipCache(KVCache):
    """A KV cache with one fill level per layer: a token that skips a layer stores nothing there."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.filled, self.touched = [0] * len(self.k), set()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.filled[layer], self.filled[layer] + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow in layer {layer}: {end} tokens > max_len={self.max_len}")
        self.k[layer][:, :, start:end] = k  # (B, n_kv, T, d_head)
        self.v[layer][:, :, start:end] = v
        self.touched.add(layer)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # the tokens that ran this layer

    def advance(self, n: int) -> None:
        super().advance(n)  # ``length`` stays the position of the next token (RoPE)
        for layer in self.touched:
            self.filled[layer] += n
        self.touched.clear()

    def truncate(self, length: int) -> None:
        raise NotImplementedError("SkipCache cannot roll back: layers hold different numbers of tokens")

    def reset(self) -> None:
        super().reset()
        self.filled, self.touched = [0] * len(self.k), set()


def new_skip_cache(model: Llama, batch_size: int, max_len: int) -> SkipCache:
    w = model.embed.weight
    return SkipCache(model.cfg.n_layers, batch_size, model.cfg.n_kv_heads, model.cfg.d_head, max_len,
                     dtype=w.dtype, device=w.device)


@torch.no_grad()
def skipdecode_generate(model: Llama, prompt: torch.Tensor, max_new_tokens: int,
                        config: SkipDecodeConfig) -> tuple[torch.Tensor, list[int]]:
    """Greedy tokens (B, T + new) with the skip schedule, and the blocks run at each decoding step."""
    require_llama(model, "model")
    if prompt.ndim != 2 or max_new_tokens < 1:
        raise ValueError(f"prompt {tuple(prompt.shape)}, max_new_tokens={max_new_tokens}: need (B, T) and >= 1")
    cache = new_skip_cache(model, prompt.shape[0], prompt.shape[1] + max_new_tokens)
    schedule = exit_schedule(max_new_tokens - 1, config, model.cfg.n_layers)
    token = model(prompt, cache)[:, -1].argmax(-1)  # the prefill runs every block: (B,)
    out = [token]
    for count in schedule:
        layers = layers_to_run(count, model.cfg.n_layers, config.skip)
        token = forward_tokens(model, token[:, None], cache, layers=layers)[0][:, -1].argmax(-1)  # (B,)
        out.append(token)
    return torch.cat([prompt, torch.stack(out, dim=1)], dim=1), schedule


@torch.no_grad()
def skipdecode_nll(model: Llama, ids: torch.Tensor, prompt_len: int, config: SkipDecodeConfig,
                   progress: bool = True) -> tuple[torch.Tensor, list[int]]:
    """Teacher-forced NLL (B, W − P − 1) of ids[:, P+1:] decoded with the skip schedule after a P-token prefill."""
    require_llama(model, "model")
    if ids.ndim != 2 or not 1 <= prompt_len < ids.shape[1] - 1:
        raise ValueError(f"ids {tuple(ids.shape)}, prompt_len={prompt_len}: need (B, W) and 1 <= P < W − 1")
    cache = new_skip_cache(model, ids.shape[0], ids.shape[1])
    model(ids[:, :prompt_len], cache)  # full prefill
    schedule = exit_schedule(ids.shape[1] - prompt_len - 1, config, model.cfg.n_layers)
    logits = []
    for j, count in enumerate(progress_bar(schedule, desc=f"SkipDecode {config.skip}", leave=False,
                                           disable=not progress)):
        layers = layers_to_run(count, model.cfg.n_layers, config.skip)
        logits.append(forward_tokens(model, ids[:, prompt_len + j:prompt_len + j + 1], cache, layers=layers)[0])
    logp = torch.cat(logits, dim=1).float().log_softmax(-1)  # (B, W − P − 1, V)
    return -logp.gather(-1, ids[:, prompt_len + 1:, None])[..., 0], schedule
