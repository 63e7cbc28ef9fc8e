"""W8A8: an int8 × int8 → int32 GEMM with per-token and per-channel scales applied in the epilogue.

Papers: the W8A8 scheme of ZeroQuant (Yao et al., 2022, arXiv:2206.01861) and SmoothQuant (Xiao et al.,
2023, arXiv:2211.10438, §4): activations quantized symmetrically per token (row) with scale a_m, weights
per output channel with scale b_n, so that

    X ≈ a ⊙ X_q (row-wise),   W ≈ b ⊙ W_q (row-wise),   Y = X Wᵀ ≈ (X_q W_qᵀ) ⊙ (a bᵀ).

The inner product X_q W_qᵀ is exact in int32 (|X_q|, |W_q| ≤ 128, so any K < 131,072 fits), and the two
scale vectors multiply the int32 result once, after the K loop. That is why SmoothQuant insists on
per-token / per-channel *scaling factors along the outer dimensions*: a scale along K (per input channel)
could not be pulled out of the sum, and int8 tensor cores could not be used.

Why a kernel. Int8 tensor cores do twice the dense fp16 work per cycle on A100/H100 (H100 SXM: 1979 vs
989 TOPS), and int8 operands halve the bytes read. A GEMM of 4096³ is compute-bound, so the bench reports
FLOPs against the roofline, whose compute roof for this entry is the int8 tensor-core peak (``compute="int8"``).

Tiles. Up to 64 tokens use one fixed tile shape (a thin, memory-bound product); larger products are
compute-bound and their best tile depends on the GPU, so the launcher lets ``triton.autotune`` time the
candidates in ``GPU_TILES`` once per (M, N, K) on first use and keep the fastest.

Glossary: X_q (M × K) int8 activations · W_q (N × K) int8 weights · a (M,) per-token scales
          · b (N,) per-channel scales · Y (M × N) output in fp16/bf16/fp32.
Left out: fusing the per-token quantization of X into the previous kernel (SmoothQuant fuses it into the
LayerNorm), int8 outputs for the next layer, per-tensor static scales (a one-element ``a`` broadcast works
through ``w8a8_matmul``'s checks only as a length-M vector), Hopper's TMA loads and warp specialisation,
split-K for thin products.
"""

from __future__ import annotations

import torch

from effref import kernels
from effref.kernels._runtime import (
    Benchmark,
    check_device,
    check_same_device,
    next_power_of_2,
    require_triton,
    tl,
    triton,
)

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_K = 2 ** 31 // 128 ** 2 - 1  # largest K whose int32 sum of int8 products cannot overflow


@triton.jit
def _w8a8_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, y_ptr,  # a (M, K) int8, b (N, K) int8, sa (M,), sb (N,) fp32, y (M, N)
    M, N, K, stride_am, stride_bn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) tokens
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output channels
    rk = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    m_ok, n_ok = rm < M, rn < N
    rm64, rn64 = rm.to(tl.int64), rn.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        # MEMORY-TRAFFIC: reads BLOCK_M·BLOCK_K + BLOCK_K·BLOCK_N int8 bytes per step (1 byte per element;
        # each operand is re-read once per tile of the other, mostly from L2).
        a = tl.load(a_ptr + rm64[:, None] * stride_am + (k0 + rk)[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0)  # (BLOCK_M, BLOCK_K) int8
        b = tl.load(b_ptr + rn64[None, :] * stride_bn + (k0 + rk)[:, None],
                    mask=n_ok[None, :] & k_ok[:, None], other=0)  # (BLOCK_K, BLOCK_N) int8, transposed view
        acc += tl.dot(a, b)  # int8 · int8 → int32, exact
    # Epilogue: Y = (X_q W_qᵀ) ⊙ (a bᵀ), one fp32 multiply pair per output.
    sa = tl.load(sa_ptr + rm64, mask=m_ok, other=0.0)  # (BLOCK_M,)
    sb = tl.load(sb_ptr + rn64, mask=n_ok, other=0.0)  # (BLOCK_N,)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]  # (BLOCK_M, BLOCK_N)
    # MEMORY-TRAFFIC: writes BLOCK_M·BLOCK_N outputs once.
    tl.store(y_ptr + rm64[:, None] * stride_ym + rn64[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


AUTOTUNE_MIN_M = 65  # from this many tokens on, the product is compute-bound and its tile is autotuned
GPU_TILES = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); int8 operands: 128 bytes of K per row
    (128, 128, 64, 8, 3),
    (128, 128, 128, 8, 3),
    (128, 256, 128, 8, 3),  # 48 KiB of operands per stage
    (256, 128, 128, 8, 3),
    (64, 256, 128, 4, 4),
    (128, 64, 128, 4, 4),
]
_w8a8_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
             for m, n, k, w, s in GPU_TILES],
    key=["M", "N", "K"],  # a tile that does not fit the GPU's shared memory is skipped by the tuner
)(_w8a8_kernel)


def _config(M: int, N: int, K: int) -> dict:
    """Fixed tile sizes: few, large programs for the interpreter; for thin products on a GPU, a 16/64-row tile."""
    if kernels.INTERPRETED:
        return {"BLOCK_M": max(16, min(next_power_of_2(M), 64)),
                "BLOCK_N": max(16, min(next_power_of_2(N), 128)),
                "BLOCK_K": max(32, min(next_power_of_2(K), 256)), "num_warps": 4}
    return {"BLOCK_M": 16 if M <= 16 else 64, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}


def w8a8_matmul(x_q: torch.Tensor, w_q: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``(x_q @ w_qᵀ) · x_scale[:, None] · w_scale[None, :]`` for int8 x_q (M, K) and w_q (N, K); (M, N) out."""
    require_triton("w8a8")
    for name, t in (("x_q", x_q), ("w_q", w_q), ("x_scale", x_scale), ("w_scale", w_scale)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("x_q", x_q), ("w_q", w_q)):
        if t.dtype != torch.int8 or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D int8 tensor, got {t.dtype} {tuple(t.shape)}; quantize it "
                             "with quantize_rows_int8")
    M, K = x_q.shape
    N = w_q.shape[0]
    if w_q.shape[1] != K:
        raise ValueError(f"x_q.shape={tuple(x_q.shape)} and w_q.shape={tuple(w_q.shape)} disagree on K; "
                         "w_q is (out_features, in_features)")
    if K > MAX_K:
        raise ValueError(f"K={K} exceeds MAX_K={MAX_K}: the int32 accumulator could overflow; split K")
    for name, t, n in (("x_scale", x_scale, M), ("w_scale", w_scale, N)):
        if t.shape != (n,) or t.dtype != torch.float32:
            raise ValueError(f"{name} must be a float32 vector of length {n}, got {t.dtype} {tuple(t.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype={out_dtype} is not supported; use one of {OUT_DTYPES}")
    check_same_device("x_q", x_q, w_q=w_q, x_scale=x_scale, w_scale=w_scale)
    check_device("x_q", x_q)

    x_q = x_q if x_q.stride(-1) == 1 else x_q.contiguous()
    w_q = w_q if w_q.stride(-1) == 1 else w_q.contiguous()
    y = torch.empty((M, N), dtype=out_dtype, device=x_q.device)  # (M, N)
    if M == 0 or N == 0:
        return y
    args = (x_q, w_q, x_scale.contiguous(), w_scale.contiguous(), y, M, N, K, x_q.stride(0), w_q.stride(0),
            y.stride(0))
    if kernels.INTERPRETED or M < AUTOTUNE_MIN_M:
        cfg = _config(M, N, K)
        _w8a8_kernel[(triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))](*args, **cfg)
    else:
        _w8a8_autotuned[tile_grid(M, N)](*args)
    return y


def tile_grid(M: int, N: int):
    """The launch grid once the autotuner has picked a tile: one program per (BLOCK_M × BLOCK_N) output tile."""
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))


def quantize_rows_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 per row: per token for activations (M, K), per channel for weights (N, K).

    Returns (codes int8 in [−127, 127], scale float32 (rows,)) with t ≈ codes · scale[:, None]; an all-zero
    row gets scale 1. This is the *dynamic* quantizer of ZeroQuant and SmoothQuant-O1: computed at run time
    from the row itself, so no calibration is needed.
    """
    if t.dim() != 2 or not t.is_floating_point():
        raise ValueError(f"t must be a 2-D floating-point tensor, got {t.dtype} {tuple(t.shape)}")
    absmax = t.detach().abs().amax(dim=1).float()  # (rows,)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))  # (rows,)
    codes = torch.round(t.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (rows, K)
    return codes, scale


def w8a8_reference(x_q: torch.Tensor, w_q: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                   out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The kernel's numerics in eager PyTorch: an exact integer product (float64 holds it exactly), then scales."""
    acc = (x_q.double() @ w_q.double().t()).to(torch.int32)  # (M, N) exact: |sum| < 2³¹ < 2⁵³
    return (acc.float() * x_scale[:, None] * w_scale[None, :]).to(out_dtype)  # (M, N)


def w8a8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """A W8A8 linear layer: quantize x (..., K) per token on the fly, then the int8 GEMM; (..., N) in x's dtype."""
    x2d = x.reshape(-1, x.shape[-1])  # (M, K)
    x_q, x_scale = quantize_rows_int8(x2d)
    return w8a8_matmul(x_q, w_q, x_scale, w_scale, out_dtype=x.dtype).reshape(*x.shape[:-1], w_q.shape[0])


# --- the bench entry ------------------------------------------------------------------------------------------
# shape = (M, N, K); dtype = the output dtype (and of the 16-bit baseline).

def w8a8_bytes(shape: tuple[int, int, int], dtype: torch.dtype) -> int:
    M, N, K = shape
    return M * K + N * K + 4 * (M + N) + torch.empty((), dtype=dtype).element_size() * M * N


def w8a8_flops(shape: tuple[int, int, int], dtype: torch.dtype) -> int:
    M, N, K = shape
    return 2 * M * N * K


def _make_inputs(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> tuple:
    M, N, K = shape
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, K, generator=gen, device=device)
    w = 0.02 * torch.randn(N, K, generator=gen, device=device)
    x_q, x_scale = quantize_rows_int8(x)
    w_q, w_scale = quantize_rows_int8(w)
    return x_q, w_q, x_scale, w_scale, x.to(dtype), w.to(dtype)  # the last two feed the 16-bit baseline


def _kernel(x_q, w_q, x_scale, w_scale, x16, w16):
    return w8a8_matmul(x_q, w_q, x_scale, w_scale, out_dtype=x16.dtype)


def _reference(x_q, w_q, x_scale, w_scale, x16, w16):
    return w8a8_reference(x_q, w_q, x_scale, w_scale, out_dtype=x16.dtype)


def _dense_linear(x_q, w_q, x_scale, w_scale, x16, w16):
    return torch.nn.functional.linear(x16, w16)  # cuBLAS in 16 bits: the baseline of the target


def _torch_int_mm(x_q, w_q, x_scale, w_scale, x16, w16):
    acc = torch._int_mm(x_q, w_q.t())  # cuBLASLt int8 GEMM (needs M > 16 and K, N multiples of 8)
    return (acc.float() * x_scale[:, None] * w_scale[None, :]).to(x16.dtype)


BENCHMARK = Benchmark(
    name="w8a8",
    make_inputs=_make_inputs,
    kernel=_kernel,
    reference=_reference,
    baselines={"F.linear 16-bit": _dense_linear,
               **({"torch._int_mm": _torch_int_mm} if hasattr(torch, "_int_mm") else {})},
    bytes_moved=w8a8_bytes,
    flops=w8a8_flops,
    shape_names="(tokens M, out N, in K)",
    compute="int8",  # the roofline's compute roof is the int8 tensor-core peak
    # compute-bound GEMMs only (torch._int_mm refuses M ≤ 16): the 4096³ target, and Llama-2-7B MLP
    shapes=[(512, 4096, 4096), (2048, 4096, 4096), (4096, 4096, 4096), (4096, 11008, 4096), (4096, 4096, 11008)],
    check_shapes=[(1, 64, 128), (33, 80, 200), (7, 48, 96)],
    dtypes=(torch.float16,),
    # identical integer sums and the same fp32 epilogue: only the final rounding may differ (one ulp)
    tolerance={torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)},
)
