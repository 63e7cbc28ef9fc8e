"""Saving and loading quantized models with safetensors: exact round trip, true size on disk.

Quantized models are saved like every other compressed model (``effref.compression.io``): the file holds every
parameter and buffer (packed codes, scales, zero points, outliers, rotations) and, in its header, the layout
of each module that changed shape or class: a QuantLinear's spec is its class and buffer layout. Loading takes
a *skeleton* (the same architecture, unquantized, any weights), swaps in empty quantized modules where the
layout says, and fills everything from the file with ``strict=True``, so nothing keeps the skeleton's values.
Left out: sharding into several files; memory-mapped lazy loading.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from effref.compression.io import load_compressed, save_compressed
from effref.quantization.linear import QuantLinear


def save_quantized(model: nn.Module, path: str | Path) -> int:
    """Write ``model`` (with its QuantLinear modules) to ``path``; return the file size in bytes."""
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("model has no QuantLinear modules; quantize it first or use safetensors directly")
    return save_compressed(model, path)


def load_quantized(model_skeleton: nn.Module, path: str | Path) -> nn.Module:
    """Fill ``model_skeleton`` (same architecture as the saved model) from ``path``; return it."""
    return load_compressed(model_skeleton, path)
