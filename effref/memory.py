"""Memory and size accounting: the peak memory of a block of code, and the bytes and parameters of a model.

Every chapter that reports memory or model size measures it here (``effref.eval`` re-exports these names, so
``from effref.eval import track_memory, model_size_bytes`` keeps working).

Peak memory (``track_memory``)
------------------------------
On CUDA: the allocator's peak (``torch.cuda.max_memory_allocated``) during the block, absolute and relative
to the bytes allocated when the block started. On CPU and MPS no allocator peak exists, so a
``TorchDispatchMode`` watches every tensor an aten op returns inside the block, adds the bytes of each new
storage when it appears and subtracts them when the storage is freed, and keeps the maximum. This counts
tensor storages only: not allocator caching or fragmentation, not Python objects, not scratch memory a
single kernel allocates and frees internally, and not tensors created before the block (pass
``baseline_bytes``, e.g. ``model_size_bytes(model)``, to add those).

Model size (``model_size_bytes``, ``parameter_count``, ``bits_per_parameter``)
------------------------------------------------------------------------------
Size is what the model's tensors occupy: the bytes of every parameter and buffer storage, each storage once
(tied embeddings, several views of one packed buffer). Quantized modules keep their codes, scales and zeros
as buffers, so their metadata is counted too, and bits per parameter = 8 · bytes / parameters, where the
parameter count is the original model's when the quantized weights are no longer parameters.

Glossary: storage = the memory block behind one or more tensors (views share it) · peak delta = the most
          bytes alive at once among those allocated inside the block · baseline = bytes added for tensors
          made before the block.
Left out: the allocator's reserved-but-unused memory, energy, multi-device runs, and the size of the files
          a model is saved as (safetensors headers, compression).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["MemoryReport", "bits_per_parameter", "model_size_bytes", "parameter_count", "track_memory"]


# ----------------------------------------------------------------------------------------------------------
# Memory


@dataclass
class MemoryReport:
    """Filled in when the ``track_memory`` block exits: ``peak_bytes = start_bytes + peak_delta_bytes``."""

    device: str
    method: str = ""
    start_bytes: int = 0  # CUDA: allocated at entry; CPU/MPS: the baseline_bytes argument
    peak_delta_bytes: int = 0  # the most bytes alive at once among those allocated inside the block
    peak_bytes: int = 0

    def describe(self) -> str:
        return f"peak {self.peak_bytes:,} bytes ({self.peak_delta_bytes:,} inside the block; {self.method})"


class _LiveStorageBytes(TorchDispatchMode):
    """Count the bytes of storages created by aten ops while active; remember the maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: dict[int, weakref.finalize] = {}  # storage data_ptr -> its finalizer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        fresh = func is torch.ops.aten.lift_fresh.default  # torch.tensor(...) data enters here
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                # A view or an in-place result shares an input's storage: no new memory.
                if ptr == 0 or ptr in self._tracked or (ptr in inputs and not fresh):
                    continue
                self._add(storage, ptr)
        return out

    def _add(self, storage: torch.UntypedStorage, ptr: int) -> None:
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self._tracked[ptr] = weakref.finalize(storage, self._free, ptr, nbytes)

    def _free(self, ptr: int, nbytes: int) -> None:
        self.live -= nbytes
        self._tracked.pop(ptr, None)  # the allocator may hand the same address to the next storage

    def detach(self) -> None:
        for finalizer in list(self._tracked.values()):
            finalizer.detach()
        self._tracked.clear()


@contextmanager
def track_memory(device: torch.device | str, baseline_bytes: int = 0) -> Iterator[MemoryReport]:
    """Measure the peak memory of the block; the yielded ``MemoryReport`` is filled in on exit.

    CUDA uses the allocator's peak (``baseline_bytes`` is ignored: the bytes at entry are measured). CPU and
    MPS count tensor storages created inside the block and add ``baseline_bytes`` (see the module docstring).
    """
    device = torch.device(device)
    if baseline_bytes < 0:
        raise ValueError(f"baseline_bytes={baseline_bytes} must be >= 0 (e.g. model_size_bytes(model))")
    report = MemoryReport(device=str(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            yield report
        finally:
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            report.method = "torch.cuda.max_memory_allocated (allocator peak)"
            report.start_bytes, report.peak_delta_bytes, report.peak_bytes = start, peak - start, peak
        return
    counter = _LiveStorageBytes()
    try:
        with counter:
            yield report
    finally:
        counter.detach()
        report.method = "live tensor storages created in the block (TorchDispatchMode) + baseline"
        report.start_bytes, report.peak_delta_bytes = baseline_bytes, counter.peak
        report.peak_bytes = baseline_bytes + counter.peak


# ----------------------------------------------------------------------------------------------------------
# Size


def _distinct_tensors(module: nn.Module, buffers: bool) -> Iterator[torch.Tensor]:
    """Parameters (and buffers) of ``module``, each shared tensor object once."""
    yield from module.parameters()
    if buffers:
        yield from module.buffers()


def model_size_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers, each storage counted once (tied weights, views of one buffer).

    Quantized modules that keep codes, scales and zeros as buffers are counted with all their metadata.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    seen: set[tuple] = set()
    total = 0
    for t in _distinct_tensors(module, buffers=True):
        ptr = t.untyped_storage().data_ptr()
        key = (t.device, ptr) if ptr != 0 else ("tensor", id(t))  # meta / empty tensors have no address
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes() if ptr != 0 else t.numel() * t.element_size()
    return total


def parameter_count(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters; a tensor shared by several modules (tied weights) is counted once."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    seen: set[tuple] = set()
    total = 0
    for p in _distinct_tensors(module, buffers=False):
        if trainable_only and not p.requires_grad:
            continue
        ptr = p.data_ptr()
        key = (p.device, ptr, tuple(p.shape), p.stride()) if ptr != 0 else ("tensor", id(p))
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def bits_per_parameter(module: nn.Module, n_params: int | None = None) -> float:
    """Storage bits per parameter: 8·model_size_bytes / n_params.

    ``n_params`` defaults to ``parameter_count(module)``. For a quantized model whose weights became
    buffers, pass the parameter count of the original model, so 4-bit codes plus scales read as ~4.5.
    """
    if n_params is None:
        n_params = parameter_count(module)
        if n_params == 0:
            raise ValueError("module has no parameters (quantized weights kept as buffers?); pass n_params= "
                             "with the parameter count of the original model")
    if n_params <= 0:
        raise ValueError(f"n_params={n_params} must be > 0; pass the original model's parameter count")
    return 8 * model_size_bytes(module) / n_params
