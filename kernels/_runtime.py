"""What every kernel module shares: the Triton import, launch-time checks, and the benchmark entry.

A kernel module starts with ``from effref.kernels._runtime import triton, tl, ...``. When Triton is installed these
are the real modules. When it is not (macOS, Windows, or a plain ``pip install effref``), they are a
stand-in that lets ``@triton.jit`` and ``tl.constexpr`` annotations evaluate, so the module still imports
and its PyTorch reference still works; the launcher's first line, ``require_triton()``, then raises an
error that says how to install it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from effref import kernels

INSTALL_HINT = "pip install 'effref[triton]'"


class _TritonMissing:
    """Stand-in for ``triton`` and ``triton.language``: attribute access and decoration are no-ops."""

    def __getattr__(self, name: str) -> Any:  # tl.constexpr, tl.float32, triton.jit, ...
        return self

    def __call__(self, fn: Any = None, **options: Any) -> Any:  # @triton.jit and @triton.jit(...)
        return fn if callable(fn) else self


try:
    import triton
    import triton.language as tl
except ImportError:  # the optional extra is not installed
    triton = _TritonMissing()
    tl = _TritonMissing()


def require_triton(kernel: str) -> None:
    """Raise a clear ImportError when Triton is missing; the first line of every launcher."""
    if not kernels.triton_available():
        raise ImportError(f"the {kernel} kernel needs Triton, which is not installed; run {INSTALL_HINT} "
                          "(Linux only), or call the PyTorch reference in the same module instead")
    if kernels.TRITON_IMPORTED_TOO_EARLY:
        raise RuntimeError(f"the {kernel} kernel would run under Triton's interpreter, but triton was imported "
                           "before effref.kernels set TRITON_INTERPRET=1 (transformers imports it when a "
                           "model loads); import effref first, or export TRITON_INTERPRET=1 before "
                           "starting Python")


def check_device(name: str, tensor: torch.Tensor) -> None:
    """Compiled Triton reads GPU memory only; the interpreter also takes CPU tensors."""
    if not kernels.INTERPRETED and tensor.device.type != "cuda":
        raise ValueError(f"{name} is on {tensor.device}, but Triton compiles for the GPU here "
                         f"({kernels.INTERPRET_REASON}); move it with .cuda(), or set "
                         "EFFREF_TRITON_INTERPRET=1 before importing effref to run the interpreter on CPU")


def check_same_device(anchor_name: str, anchor: torch.Tensor, **others: torch.Tensor) -> None:
    """Every tensor of one launch must live where ``anchor`` does; name the first one that does not."""
    for name, tensor in others.items():
        if tensor.device != anchor.device:
            raise ValueError(f"{name} is on {tensor.device} but {anchor_name} is on {anchor.device}; move it "
                             f"with .to({anchor_name}.device)")


def as_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` (..., n) as a (M, n) matrix with unit column stride: a view whenever the strides allow it."""
    x2d = x.reshape(-1, n)  # (M, n)
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def split_k_output(M: int, N: int, split_k: int, like: torch.Tensor) -> torch.Tensor:
    """The (M, N) output of a matmul launch: fp32 zeros that split-K programs add their partial sums into
    atomically, or (split_k = 1) an uninitialised tensor in ``like``'s dtype that each program writes once."""
    if split_k > 1:
        return torch.zeros((M, N), dtype=torch.float32, device=like.device)
    return torch.empty((M, N), dtype=like.dtype, device=like.device)


@functools.cache
def cuda_sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the launch heuristics ask on every call)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_split_k(n_tiles: int, k_tiles: int, sm_count: int | None = None) -> int:
    """Programs that share one output tile along K in a memory-bound (decode) matmul.

    When the output's column tiles alone give every SM two programs, they keep HBM busy by themselves: no
    split, which also spares split-K's fp32 zero-fill, atomics and final cast (two extra kernels, a few µs
    that matter when the whole product takes ~10 µs). Otherwise split until there are about four programs per
    SM, never more than one per K tile. ``sm_count`` defaults to the current CUDA device's.
    """
    sms = sm_count if sm_count is not None else cuda_sm_count(torch.cuda.current_device())
    if n_tiles >= 2 * sms:
        return 1
    return max(1, min(k_tiles, math.ceil(4 * sms / n_tiles)))


def next_power_of_2(n: int) -> int:
    """Smallest power of two ≥ n (``tl.arange`` extents must be powers of two)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


Shape = tuple[int, ...]


@dataclass(frozen=True)
class Benchmark:
    """One kernel's entry in ``python -m effref.kernels.bench``; a kernel module exposes it as ``BENCHMARK``.

    ``make_inputs(shape, dtype, device)`` returns the positional arguments that ``kernel``, ``reference`` and
    every baseline accept. ``reference`` is the correctness oracle; ``baselines`` are what the kernel is
    timed against (the reference usually among them). ``bytes_moved`` and ``flops`` give the kernel's
    ideal traffic and work for one call, from which the bench draws the roofline: the fastest possible
    time is max(bytes / peak bandwidth, flops / peak FLOP/s).
    """

    name: str
    make_inputs: Callable[[Shape, torch.dtype, torch.device], tuple]
    kernel: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    baselines: dict[str, Callable[..., torch.Tensor]]
    bytes_moved: Callable[[Shape, torch.dtype], int]
    flops: Callable[[Shape, torch.dtype], int] | None = None
    shapes: Sequence[Shape] = ()  # GPU benchmark shapes, paper-sized
    check_shapes: Sequence[Shape] = ()  # small shapes for the interpreter on CPU
    dtypes: Sequence[torch.dtype] = (torch.bfloat16,)
    tolerance: dict[torch.dtype, tuple[float, float]] = field(default_factory=dict)  # dtype -> (atol, rtol)
    shape_names: str = ""  # what the shape tuple means, e.g. "(tokens, hidden)"
    compute: str = "dtype"  # which peak bounds the FLOPs: "dtype" (16-bit or fp32 as the inputs), or "int8"
