"""EdgeMoE's expert offloading: experts live in storage and are loaded into a small in-memory cache on demand.

Paper: Yi, Guo, Wei, Zhou, Wang, Xu (2023), "EdgeMoE: Fast On-Device Inference of MoE-based Large Language
Models", arXiv:2308.14352 — §3 (non-expert weights stay in memory, expert weights are stored outside it and
loaded when a token needs them), §3.3 (an in-memory expert cache with a bounded number of slots).
Implements: ``OffloadedExperts``, a drop-in for :class:`~effref.moe.experts.Experts` whose E experts are one
safetensors file each; ``expert(e, x)`` serves expert e from a cache of ``slots`` experts, loading it from its file
on a miss and evicting the least recently used one when the cache is full; it counts hits, misses and bytes read.
``offload_experts`` moves every MoE layer of a model there (each layer its own cache), and ``lru_misses`` is the
same policy on a list of expert ids, to predict the misses of a routing trace.
Glossary: slots experts held in memory per layer · hit / miss whether a needed expert was already in memory
          · bytes read = misses × bytes of one expert.
Left out: EdgeMoE's expert-wise bit-width adaptation (experts quantized to different widths) and its preloading of
          the experts the next layer is predicted to need; the storage here is a file, read synchronously.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from effref.moe.experts import Experts, moe_layers


def lru_misses(trace: Sequence[int], slots: int) -> int:
    """How many of the requests in ``trace`` miss an LRU cache of ``slots`` entries (it starts empty)."""
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"slots={slots!r} must be an integer ≥ 1 (experts held in memory)")
    cache: OrderedDict[int, None] = OrderedDict()
    misses = 0
    for e in trace:
        if e in cache:
            cache.move_to_end(e)
            continue
        misses += 1
        cache[e] = None
        if len(cache) > slots:
            cache.popitem(last=False)
    return misses


class OffloadedExperts(nn.Module):
    """E SwiGLU experts kept in files, at most ``slots`` of them in memory (least recently used evicted)."""

    def __init__(self, experts: Experts, folder: str | Path, slots: int):
        super().__init__()
        if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= experts.n_experts:
            raise ValueError(f"slots={slots!r} must be an integer from 1 to n_experts={experts.n_experts} "
                             "(experts held in memory at once)")
        self.n_experts, self.d_model, self.d_ff = experts.n_experts, experts.d_model, experts.d_ff
        self.folder, self.slots = Path(folder), slots
        self.folder.mkdir(parents=True, exist_ok=True)
        for e in range(self.n_experts):  # one file per expert: what a device would keep in flash storage
            weights = {name: getattr(experts, name)[e].detach().contiguous().cpu() for name in ("gate", "up", "down")}
            save_file(weights, str(self.folder / f"expert_{e}.safetensors"))
        self.expert_bytes = sum(getattr(experts, n)[0].numel() * getattr(experts, n).element_size()
                                for n in ("gate", "up", "down"))
        self.dtype, self.device = experts.gate.dtype, experts.gate.device
        self.cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self.hits = self.misses = 0

    @property
    def bytes_read(self) -> int:
        return self.misses * self.expert_bytes

    def fetch(self, e: int) -> dict[str, torch.Tensor]:
        """Expert e's weights from the cache, loading them from storage on a miss."""
        if e in self.cache:
            self.hits += 1
            self.cache.move_to_end(e)
            return self.cache[e]
        self.misses += 1
        stored = load_file(str(self.folder / f"expert_{e}.safetensors"))  # the read from storage
        weights = {name: w.to(self.device, self.dtype) for name, w in stored.items()}
        self.cache[e] = weights
        if len(self.cache) > self.slots:
            self.cache.popitem(last=False)  # evict the least recently used expert
        return weights

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """FFN_e(x) for rows x (n, D) -> (n, D), with expert e fetched through the cache."""
        w = self.fetch(e)
        return (F.silu(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T


def offload_experts(model: nn.Module, folder: str | Path, slots: int) -> list[OffloadedExperts]:
    """Move the experts of every MoE layer of ``model`` to files under ``folder`` (layer i in ``layer_i``), keeping
    ``slots`` per layer in memory; returns the new expert banks (their ``hits``, ``misses``, ``bytes_read``)."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layers to offload; build it with effref.moe "
                         "(e.g. Mixtral(MixtralConfig(...)))")
    banks = []
    for i, layer in enumerate(layers):
        if not isinstance(layer.experts, Experts):
            raise ValueError(f"MoE layer {i} holds {type(layer.experts).__name__}, not Experts; offload a model "
                             "once")
        layer.experts = OffloadedExperts(layer.experts, Path(folder) / f"layer_{i}", slots)
        banks.append(layer.experts)
    return banks
