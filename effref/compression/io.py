"""Saving and loading compressed models exactly: pruned zeros, removed heads and channels, factorised layers.

A pruned or factorised model no longer matches the architecture its config describes: linears have fewer
rows, attention modules fewer heads, some modules are replaced by low-rank or tensor-train ones. The file
(safetensors) holds every tensor bit for bit plus, in its header, a JSON *layout*: for each module that
determines shapes — every ``nn.Linear`` / ``nn.Embedding`` (their sizes), every module with a ``spec()`` and
``from_spec`` (its class and constructor spec), and the head-count attributes of attention modules.
Loading takes a *skeleton* (the same base architecture, any weights), rebuilds the modules whose layout
differs, sets the head counts, and fills all tensors with ``strict=True``, so nothing can be silently left
at the skeleton's values. Unstructured masks need no extra storage: the zeros are stored exactly.
Glossary: layout = {module name: {"class", "spec", "attrs"}} · skeleton = freshly built base model.
Left out: compressed on-disk formats for sparse weights (CSR, 2:4 metadata); sharded files.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

_KEY = "effref.compressed_layout"
HEAD_ATTRS = ("n_heads", "n_kv_heads", "num_key_value_groups")


def _entry(module: nn.Module) -> dict | None:
    attrs = {a: getattr(module, a) for a in HEAD_ATTRS if isinstance(getattr(module, a, None), int)}
    if hasattr(module, "spec") and hasattr(type(module), "from_spec"):
        cls = type(module)
        entry = {"class": f"{cls.__module__}.{cls.__qualname__}", "spec": module.spec()}
    elif type(module) is nn.Linear:
        entry = {"class": "torch.nn.Linear", "spec": {"in": module.in_features, "out": module.out_features,
                                                       "bias": module.bias is not None}}
    elif type(module) is nn.Embedding:
        entry = {"class": "torch.nn.Embedding", "spec": {"num": module.num_embeddings, "dim": module.embedding_dim}}
    else:
        entry = {}
    if attrs:
        entry["attrs"] = attrs
    return entry or None


def layout(model: nn.Module) -> dict[str, dict]:
    """The shape-determining description of ``model`` that ``save_compressed`` writes."""
    out = {name: e for name, m in model.named_modules() if name and (e := _entry(m)) is not None}
    cfg = getattr(model, "cfg", None)
    if cfg is not None and isinstance(getattr(cfg, "n_kv_heads", None), int):  # our Llama's cache shape
        out[""] = {"attrs": {"cfg.n_kv_heads": cfg.n_kv_heads}}
    return out


def save_compressed(model: nn.Module, path: str | Path) -> int:
    """Write ``model`` with its layout to ``path`` (safetensors); return the file size in bytes."""
    path = Path(path)
    save_model(model, str(path), metadata={_KEY: json.dumps(layout(model))})  # tied tensors stored once
    return path.stat().st_size


def _build(entry: dict, like: nn.Module) -> nn.Module:
    ref = next(like.parameters(), None) if isinstance(like, nn.Module) else None
    kw = {"device": ref.device, "dtype": ref.dtype} if ref is not None and ref.is_floating_point() else {}
    spec = entry["spec"]
    if entry["class"] == "torch.nn.Linear":
        return nn.Linear(spec["in"], spec["out"], bias=spec["bias"], **kw)
    if entry["class"] == "torch.nn.Embedding":
        return nn.Embedding(spec["num"], spec["dim"], **kw)
    module, _, name = entry["class"].rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    if cls is None or not hasattr(cls, "from_spec"):
        raise TypeError(f"{entry['class']} in the file is not a class with from_spec; was it renamed?")
    new = cls.from_spec(spec)
    if getattr(cls, "spec_sets_dtypes", False):  # e.g. QuantLinear: int codes, fp16 scales, fp32 rotations
        kw.pop("dtype", None)
    return new.to(**kw) if kw else new


def load_compressed(model_skeleton: nn.Module, path: str | Path) -> nn.Module:
    """Rebuild ``model_skeleton`` (same base architecture as the saved model) to the saved layout and fill it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}; write one with save_compressed(model, path)")
    with safe_open(str(path), framework="pt") as f:
        header = (f.metadata() or {}).get(_KEY)
    if header is None:
        raise ValueError(f"{path} has no {_KEY!r} entry in its header; it was not written by save_compressed "
                         "(or save_quantized)")
    saved = json.loads(header)
    current = layout(model_skeleton)
    for name, entry in sorted(saved.items(), key=lambda kv: kv[0].count(".")):  # parents before children
        here = current.get(name) or {}
        if name and "class" in entry and (here.get("class"), here.get("spec")) != (entry["class"], entry["spec"]):
            try:
                old = model_skeleton.get_submodule(name)
            except AttributeError:
                old = None
            parent, _, child = name.rpartition(".")
            try:
                holder = model_skeleton.get_submodule(parent) if parent else model_skeleton
            except AttributeError as err:
                raise ValueError(f"the file has a module {name} that the skeleton cannot hold; pass the "
                                 "architecture the file was saved from") from err
            setattr(holder, child, _build(entry, old if old is not None else holder))
        for attr, value in entry.get("attrs", {}).items():
            target = model_skeleton.get_submodule(name) if name else model_skeleton
            *path_parts, last = attr.split(".")
            for part in path_parts:
                target = getattr(target, part)
            setattr(target, last, value)
    first = next(model_skeleton.parameters(), None)
    load_model(model_skeleton, str(path), strict=True, device=str(first.device) if first is not None else "cpu")
    return model_skeleton


def same_tensors(a: nn.Module, b: nn.Module) -> bool:
    """True when ``a`` and ``b`` have the same state-dict keys and bit-identical tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
