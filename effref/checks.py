"""Argument checks shared by the public entry points, so that a wrong argument fails early, by its name, with
the fix, instead of deep inside a technique with an attribute error.

``config_or_default(cfg, Expected, example)`` is the one every model-level call runs on its config: ``None``
gives ``Expected()``, an instance passes, anything else (a float where a ``PruneConfig`` belongs, a
``QuantConfig`` where a ``GPTQConfig`` wraps one, a dict) raises a ``TypeError`` saying what to pass.
``on_off(name, value, choices)`` reads an on/off environment switch (``EFFREF_PROGRESS``,
``EFFREF_TRITON_INTERPRET``) and refuses anything ambiguous. ``calibration_or_none(calib_batches, call)`` guards the one argument order every model-level compression call
uses, ``(model, calib_batches, cfg)``: a config in the batches' place is refused with that order.
"""

from __future__ import annotations

from typing import TypeVar

import torch

Config = TypeVar("Config")
ON_WORDS, OFF_WORDS = ("1", "true", "on", "yes"), ("0", "false", "off", "no")  # what Triton itself reads as on


def on_off(name: str, value: str, choices: str) -> bool:
    """The switch ``name`` set to ``value``: True or False, or a ValueError that says what ``choices`` mean."""
    word = value.strip().lower()
    if word not in ON_WORDS + OFF_WORDS:
        raise ValueError(f"{name}={value!r} is not an on/off value; set it to {choices}")
    return word in ON_WORDS


def config_or_default(value: object, expected: type[Config], example: str, name: str = "cfg") -> Config:
    """``value`` when it is an ``expected``, a default ``expected()`` when it is None; else a TypeError."""
    if value is None:
        return expected()
    if not isinstance(value, expected):
        raise TypeError(f"{name} must be a {expected.__name__}, got {type(value).__name__} {value!r}; "
                        f"pass e.g. {example}")
    return value


def calibration_or_none(value: object, call: str) -> torch.Tensor | None:
    """``value`` when it is a (n, T) tensor of token ids, or None; anything else is refused with the order."""
    if value is None:
        return value
    if isinstance(value, torch.Tensor):
        if value.ndim != 2 or value.is_floating_point() or value.is_complex() or value.numel() == 0:
            raise ValueError(f"{call}: calib_batches must be a (n, T) tensor of token ids, got shape "
                             f"{tuple(value.shape)} {value.dtype}; use effref.data.calibration_batches")
        return value
    raise TypeError(f"{call} takes (model, calib_batches, cfg), like every model-level compression call: "
                    f"calib_batches must be a (n, T) tensor of token ids or None, got {type(value).__name__}; "
                    "pass the config after the batches, or as cfg=...")


def token_ids_or_raise(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse anything but integer token ids (B, T ≥ 1) inside a vocabulary of ``vocab_size``, naming the fix."""
    if input_ids.ndim != 2 or input_ids.shape[1] == 0 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be integer token ids of shape (B, T) with T >= 1, got "
                         f"{tuple(input_ids.shape)} {input_ids.dtype}; use ids[None] for one sequence")
    low, high = input_ids.min().item(), input_ids.max().item()
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids hold token ids from {low} to {high}, outside this model's vocabulary "
                         f"0..{vocab_size - 1}; tokenize with the model's own tokenizer")
