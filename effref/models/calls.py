"""One call for two model interfaces: transformers causal LMs and our own ``effref.models.llama.Llama``.

A transformers model returns an output object with ``.logits`` and generates through ``GenerationMixin``;
our Llama returns the logits tensor itself and has its own ``generate``. The measuring code (``effref.eval``),
the fine-tuning harness, distillation and the PEFT wrappers call models through these few functions, so
that each of them works on either kind without asking which it got.

Glossary: B batch · T tokens · V vocabulary.
Left out: encoder–decoder models, and models whose forward needs more than token ids.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model without tensors."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def is_transformers_model(model: nn.Module) -> bool:
    """True for a transformers model that can generate (checked without importing transformers)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.GenerationMixin)


def forward_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) for ids (B, T), whether the model returns a tensor or an object with ``.logits``."""
    out = model(ids, use_cache=False) if is_transformers_model(model) else model(ids)
    if isinstance(out, torch.Tensor):
        return out  # (B, T, V)
    if hasattr(out, "logits"):
        return out.logits  # (B, T, V)
    raise TypeError(f"model returned {type(out).__name__}; expected a logits tensor or an object with "
                    ".logits (a transformers causal LM or effref.models.llama.Llama)")


def greedy_generate(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation of ids (B, T) by exactly ``new_tokens`` tokens: (B, T + new_tokens)."""
    if is_transformers_model(model):
        mask = torch.ones_like(ids)  # (B, T): no padding, said explicitly to silence the warning
        pad = model.generation_config.pad_token_id
        if pad is None:
            pad = model.generation_config.eos_token_id
        if isinstance(pad, list):
            pad = pad[0] if pad else None
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=pad if pad is not None else 0)
    else:
        out = model.generate(ids, new_tokens, temperature=0.0)
    if out.shape != (ids.shape[0], ids.shape[1] + new_tokens):
        raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected "
                           f"{(ids.shape[0], ids.shape[1] + new_tokens)}; did it stop early at an EOS token?")
    return out  # (B, T + new_tokens)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that a timer reads the time the work really took."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
