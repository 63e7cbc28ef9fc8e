"""Saving and loading quantized models with safetensors: exact round trip, true size on disk.

The file holds every parameter and buffer (packed codes, scales, zero points, outliers, rotations) plus, in
the safetensors header, a JSON map from each quantized module's name to its class and layout. Loading takes
a *skeleton* (the same architecture, unquantized, any weights), swaps in empty quantized modules where the
map says, and fills everything from the file with ``strict=True``.
Left out: sharding into several files; memory-mapped lazy loading.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from effref.quantization.linear import QuantLinear

_KEY = "effref.quantized_modules"


def save_quantized(model: nn.Module, path: str | Path) -> int:
    """Write ``model`` (with its QuantLinear modules) to ``path``; return the file size in bytes."""
    modules = {name: {"in": m.in_features, "out": m.out_features, "meta": m.meta}
               for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not modules:
        raise ValueError("model has no QuantLinear modules; quantize it first or use safetensors directly")
    path = Path(path)
    save_model(model, str(path), metadata={_KEY: json.dumps(modules)})  # shared (tied) tensors stored once
    return path.stat().st_size


def _class(dotted: str) -> type[QuantLinear]:
    module, _, name = dotted.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, QuantLinear)):
        raise TypeError(f"{dotted} in the file is not a QuantLinear class")
    return cls


def load_quantized(model_skeleton: nn.Module, path: str | Path) -> nn.Module:
    """Fill ``model_skeleton`` (same architecture as the saved model) from ``path``; return it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}; write one with save_quantized(model, path)")
    with safe_open(str(path), framework="pt") as f:
        header = (f.metadata() or {}).get(_KEY)
    if header is None:
        raise ValueError(f"{path} has no {_KEY!r} entry in its header; it was not written by save_quantized")
    for name, spec in json.loads(header).items():
        try:
            old = model_skeleton.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"the file quantizes {name}, which the skeleton lacks; pass the same architecture "
                             "the file was saved from") from err
        new = _class(spec["meta"]["class"]).from_meta(spec["in"], spec["out"], spec["meta"])
        parent, _, child = name.rpartition(".")
        device = next(old.buffers(), next(old.parameters(), None))
        setattr(model_skeleton.get_submodule(parent) if parent else model_skeleton, child,
                new if device is None else new.to(device.device))
    first = next(model_skeleton.parameters(), None)
    load_model(model_skeleton, str(path), strict=True, device=str(first.device) if first is not None else "cpu")
    return model_skeleton
