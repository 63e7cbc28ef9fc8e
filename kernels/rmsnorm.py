"""RMSNorm forward as one fused Triton kernel: read each row once, write it once.

Paper: Zhang & Sennrich (2019), "Root Mean Square Layer Normalization", arXiv:1910.07467 — Eq. 4.
The normalisation every Llama-family block applies twice: LayerNorm without the mean subtraction and
without the bias, rescaling each row of activations by its root mean square,

    y_i = x_i / RMS(x) · g_i,        RMS(x) = sqrt( (1/n) Σ_j x_j² + ε ).

(The paper's equation has no ε; every implementation adds one under the root so that an all-zero row
gives zeros instead of NaN.)

Why fuse it. The work is trivial (about 4 FLOPs per element) and the traffic is everything. Written as
eager PyTorch (``rmsnorm_reference`` below) it is a chain of separate kernels, each of which reads its input
from and writes its output to GPU memory: upcast, square, mean, two multiplies, downcast. For a bf16 x that
is about 40 bytes of memory traffic per element (upcast 2+4, square 4+4, mean 4, multiplies 2·(4+4),
downcast 4+2); for fp32, 28. The fused kernel keeps a whole row in registers and moves 2 + 2 bytes per
element (fp32: 4 + 4): one read of x, one write of y, plus the n-element weight. At ~1 FLOP per byte
the kernel sits far below any GPU's ridge point (H100: ~300 FLOP/byte), so its roofline is bandwidth:
the best possible time is ``rmsnorm_bytes(...) / peak HBM bandwidth``.

Implements: forward pass for any leading dimensions (flattened into M rows), rows of up to MAX_COLS
elements, fp32 / fp16 / bf16 activations and weight, fp32 accumulation, output in x's dtype.
Glossary: x (M × n) activations · g (n,) learned gain, ``weight`` · ε ``eps`` · RMS root mean square
          · BLOCK_M rows per program · BLOCK_N columns per program (next power of two ≥ n, masked).
Left out: the backward pass (training needs dx and dg; the dg reduction across rows is the interesting
part); rows wider than MAX_COLS, which need a loop over column chunks; the fusions serving engines add
(residual add before the norm, quantising the output for the next matmul).
"""

from __future__ import annotations

import math

import torch

from effref import kernels
from effref.kernels._runtime import (
    Benchmark,
    as_rows,
    check_device,
    next_power_of_2,
    require_triton,
    tl,
    triton,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_COLS = 65536  # a whole row lives in registers; real hidden sizes are ≤ 16384


@triton.jit
def _rmsnorm_fwd_kernel(
    x_ptr, w_ptr, y_ptr,  # x, y: (M, n) with unit column stride; w: (n,)
    n_rows, n_cols, stride_x_row, stride_y_row, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program p normalises rows p·BLOCK_M … p·BLOCK_M + BLOCK_M - 1, each held whole in one tile.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]  # (BLOCK_M, BLOCK_N)
    rows64 = rows.to(tl.int64)  # M·n may exceed 2³¹ elements

    # MEMORY-TRAFFIC: reads BLOCK_M·n elements of x (its only read); upcast at once, because fp32 is the
    # accumulation type and the interpreter gets bf16 arithmetic wrong.
    x = tl.load(x_ptr + rows64[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)  # (BLOCK_M, BLOCK_N)
    mean_sq = tl.sum(x * x, axis=1) / n_cols  # (BLOCK_M,)  padding columns are 0 and add nothing
    inv_rms = 1.0 / tl.sqrt(mean_sq + eps)  # (BLOCK_M,)  Eq. 4: 1 / RMS(x)

    # MEMORY-TRAFFIC: reads n elements of g per program (served from L2 after the first program).
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_N,)
    y = x * inv_rms[:, None] * w[None, :]  # (BLOCK_M, BLOCK_N)

    # MEMORY-TRAFFIC: writes BLOCK_M·n elements of y, rounded once from fp32 to y's dtype.
    tl.store(y_ptr + rows64[:, None] * stride_y_row + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _launch_config(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """Pick (BLOCK_M, BLOCK_N, num_warps): whole rows per tile; the tile size depends on who runs it."""
    block_n = next_power_of_2(n_cols)
    if kernels.INTERPRETED:
        # The interpreter pays per program, not per element: few programs with big tiles.
        block_m = min(next_power_of_2(n_rows), max(1, 65536 // block_n))
    else:
        # A GPU wants many programs in flight: pack rows only while a tile stays ≤ 4096 elements.
        block_m = min(next_power_of_2(n_rows), max(1, 4096 // block_n))
    num_warps = min(max(block_m * block_n // 512, 1), 16)  # ~16 fp32 values per thread, at most 512 threads
    return block_m, block_n, num_warps


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` with gain ``weight``, in one Triton kernel.

    ``x`` may have any number of leading dimensions and any strides (rows are copied to a contiguous buffer
    only when the last dimension is not contiguous or the rows cannot be addressed with one stride). The
    statistics and the products are computed in fp32; the result has ``x``'s shape and dtype. Forward only:
    there is no backward pass, so the call refuses inputs that would need one.
    """
    require_triton("rmsnorm")
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"x and weight must be torch.Tensor, got {type(x).__name__} and "
                        f"{type(weight).__name__}; convert with torch.as_tensor")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x.shape={tuple(x.shape)} has no last dimension to normalise; pass x with shape "
                         "(..., n) and n ≥ 1")
    n = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n:
        raise ValueError(f"weight.shape={tuple(weight.shape)} does not match x.shape[-1]={n}; pass a weight "
                         f"of shape ({n},)")
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}.dtype={t.dtype} is not supported; convert with .float(), .half() or "
                            ".bfloat16()")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}; move weight with "
                         f".to({str(x.device)!r})")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps={eps!r} must be a positive finite number (it keeps 1/RMS finite for an "
                         "all-zero row); the usual values are 1e-6 or 1e-5")
    if n > MAX_COLS:
        raise ValueError(f"x.shape[-1]={n} exceeds MAX_COLS={MAX_COLS}, the widest row this kernel holds in "
                         "registers; use rmsnorm_reference for such rows")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        raise RuntimeError("rmsnorm has no backward pass, but x or weight requires grad; call it under "
                           "torch.no_grad() / torch.inference_mode(), or train with rmsnorm_reference")
    check_device("x", x)

    x2d = as_rows(x, n)  # (M, n)  unit column stride, as the kernel assumes
    y2d = torch.empty(x2d.shape, dtype=x.dtype, device=x.device)  # (M, n)
    n_rows = x2d.shape[0]
    if n_rows == 0:
        return y2d.reshape(x.shape)
    block_m, block_n, num_warps = _launch_config(n_rows, n)
    grid = (triton.cdiv(n_rows, block_m),)
    _rmsnorm_fwd_kernel[grid](
        x2d, weight.contiguous(), y2d,
        n_rows, n, x2d.stride(0), y2d.stride(0), float(eps),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y2d.reshape(x.shape)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm in eager PyTorch, with the kernel's numerics: fp32 throughout, one rounding at the end."""
    xf = x.float()  # (..., n)  bf16: reads 2, writes 4 bytes per element
    mean_sq = xf.pow(2).mean(dim=-1, keepdim=True)  # (..., 1)  square: 4 + 4, mean: 4
    y = xf * torch.rsqrt(mean_sq + eps) * weight.float()  # (..., n)  two multiplies: 2 · (4 + 4)
    return y.to(x.dtype)  # (..., n)  reads 4, writes 2


def rmsnorm_bytes(shape: tuple[int, ...], dtype: torch.dtype, weight_dtype: torch.dtype | None = None) -> int:
    """Ideal memory traffic of one call: read x once, read the weight once, write y once."""
    n = shape[-1]
    m = math.prod(shape[:-1])
    x_size = torch.empty((), dtype=dtype).element_size()
    w_size = torch.empty((), dtype=weight_dtype or dtype).element_size()
    return 2 * m * n * x_size + n * w_size  # x in, y out, g in


def rmsnorm_flops(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Arithmetic of one call: square and add per element, two multiplies per element; ignores the sqrt."""
    return 4 * math.prod(shape)


def _make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)  # (..., n)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen, device=device)).to(dtype)  # (n,)
    return x, weight


def _torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """PyTorch's own ``F.rms_norm`` (torch ≥ 2.4), with the argument order of the functions above."""
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)


BENCHMARK = Benchmark(
    name="rmsnorm",
    make_inputs=_make_inputs,
    kernel=rmsnorm,
    reference=rmsnorm_reference,
    baselines={"eager": rmsnorm_reference,
               **({"F.rms_norm": _torch_rms_norm} if hasattr(torch.nn.functional, "rms_norm") else {})},
    bytes_moved=rmsnorm_bytes,
    flops=rmsnorm_flops,
    shape_names="(tokens, hidden)",
    # decode (1 and 16 tokens) and prefill (4096 tokens) at SmolLM2-135M, Llama-2-7B and Llama-2-70B widths
    shapes=[(1, 4096), (16, 4096), (4096, 576), (4096, 2048), (4096, 4096), (4096, 8192), (16384, 4096)],
    check_shapes=[(1, 576), (33, 576), (2, 5, 100)],
    dtypes=(torch.bfloat16, torch.float32),
    # bf16/fp16: the reference rounds the same fp32 value once, so they differ by at most one ulp
    tolerance={torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)},
)
