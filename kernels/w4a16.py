"""W4A16: a matmul that reads 4-bit packed weights and dequantizes them in registers.

Papers: the storage format of GPTQ (Frantar et al., 2023, arXiv:2210.17323) and AWQ (Lin et al., 2023,
arXiv:2306.00978): 4-bit codes q ∈ {0 … 15}, one fp16 scale s and zero point z per group of g consecutive
input channels of one output row, so that

    W[n, k] ≈ (q[n, k] − z[n, k // g]) · s[n, k // g],        y = x Wᵀ.

Why a kernel. Decoding one token multiplies a 1 × K activation by the N × K weight: two FLOPs per weight
element, so the time is the time to *read the weight*. In fp16 that is 2 bytes per element; packed int4 is
0.5 bytes plus 4 bytes of scale and zero per group (0.53 bytes at g = 128), so a kernel that never writes the
dequantized weight back to memory can approach a 3.7× speed-up at batch 1. Dequantizing first and calling
``F.linear`` (``w4a16_reference``) reads the packed weight, writes an fp16 copy, and reads that again: slower
than plain fp16. Here the dequantization happens on the tile the matmul already holds in registers.

Layout (the contract with ``effref.quantization``): ``qweight`` is (N, K/2) uint8, byte j of row n holding
code k = 2j in its low nibble and k = 2j + 1 in its high nibble; ``scales`` and ``zeros`` are (N, K/g), zeros
as (possibly fractional) code offsets. The kernel splits every K tile by parity — the even columns of x meet
the low nibbles, the odd ones the high nibbles — so no interleaving is needed in registers.

Two launch paths of the same kernel:
- decode (M ≤ 16 rows, GEMV-like, memory-bound): a 16-row tile and narrow column blocks. An 11008-row weight
  gives 344 column blocks, enough to keep every SM reading; a 4096-row one gives 128, so it also splits K
  (``decode_split_k``) and the partial sums meet in an fp32 buffer by atomic adds.
- prefill (M > 16, compute-bound for large M): the classic tiled matmul with square 64–128 tiles.

Glossary: x (M × K) activations · qweight (N × K/2) packed codes · s, z (N × K/g) scales and zeros
          · g ``group_size`` · BLOCK_M/N/K tile sizes · SPLIT_K programs sharing one output tile along K.
Left out: tuned configurations (the GPU configs below are reasonable defaults, not autotuned), the
tensor-core-friendly weight shuffles of Marlin/ExLlama, int4 zeros, act-order permutations (GPTQ's
``g_idx``), and a backward pass.
"""

from __future__ import annotations

import math

import torch

from effref import kernels
from effref.kernels._runtime import (
    Benchmark,
    as_rows,
    check_device,
    check_same_device,
    decode_split_k,
    next_power_of_2,
    require_triton,
    split_k_output,
    tl,
    triton,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PATHS = ("auto", "decode", "prefill")
DECODE_MAX_ROWS = 16  # up to this many rows (tokens) the decode path is used


@triton.jit
def _w4a16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr,  # x (M, K), qweight (N, K/2) uint8, s/z (N, K/g), y (M, N)
    M, N, K, stride_xm, stride_qn, stride_sn, stride_ym,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows of x and y
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output channels
    half = tl.arange(0, BLOCK_K // 2)  # (BLOCK_K/2,) byte offsets inside one K tile
    m_ok, n_ok = rm < M, rn < N
    rm64, rn64 = rm.to(tl.int64), rn.to(tl.int64)

    k_tiles = K // BLOCK_K  # the launcher guarantees BLOCK_K | g | K
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    first, last = pid_k * per_split, tl.minimum((pid_k + 1) * per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(first, last):
        k0 = t * BLOCK_K
        # MEMORY-TRAFFIC: reads BLOCK_N · BLOCK_K/2 bytes of packed codes: the weight's only read.
        packed = tl.load(qw_ptr + rn64[None, :] * stride_qn + (k0 // 2 + half)[:, None],
                         mask=n_ok[None, :], other=0)  # (BLOCK_K/2, BLOCK_N) uint8, transposed view
        g = k0 // GROUP  # one group per column for the whole tile, because BLOCK_K divides g
        # MEMORY-TRAFFIC: reads BLOCK_N scales and zeros per tile, 4 bytes per g weights.
        s = tl.load(s_ptr + rn64 * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)  # (BLOCK_N,)
        z = tl.load(z_ptr + rn64 * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)  # (BLOCK_N,)
        w_even = ((packed & 0xF).to(tl.float32) - z[None, :]) * s[None, :]  # (BLOCK_K/2, BLOCK_N) k = k0+2j
        w_odd = ((packed >> 4).to(tl.float32) - z[None, :]) * s[None, :]  # (BLOCK_K/2, BLOCK_N) k = k0+2j+1
        # MEMORY-TRAFFIC: reads BLOCK_M · BLOCK_K activations (from L2 after the first column block).
        x_base = x_ptr + rm64[:, None] * stride_xm + (k0 + 2 * half)[None, :]
        x_even = tl.load(x_base, mask=m_ok[:, None], other=0.0)  # (BLOCK_M, BLOCK_K/2)
        x_odd = tl.load(x_base + 1, mask=m_ok[:, None], other=0.0)  # (BLOCK_M, BLOCK_K/2)
        if UPCAST:  # fp32 activations, or the interpreter (which gets 16-bit arithmetic wrong)
            x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
        else:  # 16-bit tensor cores: the weight is rounded to x's dtype once, like the reference does
            w_even, w_odd = w_even.to(x_even.dtype), w_odd.to(x_even.dtype)
        if IEEE:
            acc += tl.dot(x_even, w_even, input_precision="ieee")  # no TF32 for fp32 inputs
            acc += tl.dot(x_odd, w_odd, input_precision="ieee")
        else:
            acc += tl.dot(x_even, w_even)  # (BLOCK_M, BLOCK_N), fp32 accumulation
            acc += tl.dot(x_odd, w_odd)

    y_ptrs = y_ptr + rm64[:, None] * stride_ym + rn64[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        # MEMORY-TRAFFIC: writes BLOCK_M · BLOCK_N outputs once, rounded from fp32 to y's dtype.
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:  # y is an fp32 buffer that the SPLIT_K programs of this tile add into
        tl.atomic_add(y_ptrs, acc, mask=mask)


def _config(M: int, N: int, K: int, group_size: int, path: str, split_k: int | None) -> dict:
    """Tile sizes for one launch. GPU values are sensible defaults, untuned; the interpreter wants few programs."""
    if kernels.INTERPRETED:
        cfg = {"BLOCK_M": max(16, min(next_power_of_2(M), 64)),
               "BLOCK_N": max(16, min(next_power_of_2(N), 128)),
               "BLOCK_K": group_size, "SPLIT_K": 1, "num_warps": 4}
    elif path == "decode":
        cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": min(group_size, 128), "num_warps": 4, "num_stages": 4}
        cfg["SPLIT_K"] = decode_split_k(math.ceil(N / cfg["BLOCK_N"]), K // cfg["BLOCK_K"])
    else:
        cfg = {"BLOCK_M": 128 if M >= 128 else 64, "BLOCK_N": 128, "BLOCK_K": min(group_size, 64),
               "SPLIT_K": 1, "num_warps": 8, "num_stages": 3}
    if split_k is not None:
        cfg["SPLIT_K"] = split_k
    return cfg


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, path: str = "auto", split_k: int | None = None) -> torch.Tensor:
    """``x @ dequant(qweight)ᵀ`` for x (..., K) and a packed 4-bit (N, K/2) weight; returns (..., N) in x's dtype.

    ``path`` picks the decode configuration (≤ 16 rows, split-K) or the prefill one; ``auto`` decides from
    the number of rows. ``split_k`` overrides the split (for tests). Forward only.
    """
    require_triton("w4a16")
    for name, t in (("x", x), ("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x.dtype={x.dtype} is not supported; convert with .half(), .bfloat16() or .float()")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"qweight must be a 2-D uint8 tensor (N, K/2) of packed 4-bit codes, got "
                         f"{qweight.dtype} {tuple(qweight.shape)}; pack two codes per byte, low nibble first")
    if x.dim() == 0 or x.shape[-1] != 2 * qweight.shape[1]:
        raise ValueError(f"x.shape={tuple(x.shape)} does not match qweight.shape={tuple(qweight.shape)}: x's "
                         f"last dimension must be K = 2 · {qweight.shape[1]} = {2 * qweight.shape[1]}")
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 32 \
            or group_size & (group_size - 1) or K % group_size:
        raise ValueError(f"group_size={group_size!r} must be a power of two ≥ 32 that divides K={K}; "
                         "use 64 or 128")
    expected = (N, K // group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != expected:
            raise ValueError(f"{name}.shape={tuple(t.shape)} must be (N, K / group_size) = {expected}")
        if not t.is_floating_point():
            raise TypeError(f"{name}.dtype={t.dtype} must be floating point; convert with .half()")
    if path not in PATHS:
        raise ValueError(f"path={path!r} is not known; use one of {PATHS}")
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k={split_k!r} must be a positive integer or None (automatic)")
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("w4a16_matmul has no backward pass, but x requires grad; call it under "
                           "torch.no_grad(), or train with w4a16_reference")
    check_same_device("x", x, qweight=qweight, scales=scales, zeros=zeros)
    check_device("x", x)

    x2d = as_rows(x, K)  # (M, K)
    M = x2d.shape[0]
    path = ("decode" if M <= DECODE_MAX_ROWS else "prefill") if path == "auto" else path
    cfg = _config(M, N, K, group_size, path, split_k)
    split = cfg["SPLIT_K"]
    y2d = split_k_output(M, N, split, x)  # (M, N)
    if M == 0:
        return y2d.to(x.dtype).reshape(*x.shape[:-1], N)
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), split)
    upcast = kernels.INTERPRETED or x.dtype == torch.float32
    _w4a16_kernel[grid](x2d, qweight, scales, zeros, y2d, M, N, K, x2d.stride(0), qweight.stride(0),
                        scales.stride(0), y2d.stride(0), GROUP=group_size, UPCAST=upcast,
                        IEEE=x.dtype == torch.float32 and not kernels.INTERPRETED, **cfg)
    return y2d.to(x.dtype).reshape(*x.shape[:-1], N)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 → (N, K) uint8 codes: byte j gives code 2j (low nibble) and 2j + 1 (high nibble)."""
    return torch.stack([qweight & 0xF, qweight >> 4], dim=-1).reshape(qweight.shape[0], -1)  # (N, K)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """The fp32 weight (N, K) that the packed format stands for: (q − z) · s, group by group."""
    codes = unpack_int4(qweight).float()  # (N, K)
    s = scales.float().repeat_interleave(group_size, dim=1)  # (N, K)
    z = zeros.float().repeat_interleave(group_size, dim=1)  # (N, K)
    return (codes - z) * s  # (N, K)


def w4a16_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """Dequantize to x's dtype, then one matmul with fp32 accumulation: the kernel's numerics in eager PyTorch.

    Traffic when timed: reads N·K/2 packed bytes, writes and re-reads an N·K 16-bit copy of the weight.
    """
    w = dequantize_int4(qweight, scales, zeros, group_size).to(x.dtype)  # (N, K), rounded once like the kernel
    return (x.float() @ w.float().t()).to(x.dtype)  # (..., N)


# --- the bench entry ------------------------------------------------------------------------------------------
# shape = (M, N, K): M tokens, an N × K weight; group size 128 (64 when K is smaller)

def _group(K: int) -> int:
    return 128 if K % 128 == 0 else 64 if K % 64 == 0 else 32


def w4a16_bytes(shape: tuple[int, int, int], dtype: torch.dtype) -> int:
    """Ideal traffic: packed weight + fp16 scales and zeros + x read once + y written once."""
    M, N, K = shape
    act = torch.empty((), dtype=dtype).element_size()
    return N * K // 2 + 2 * 2 * N * (K // _group(K)) + act * (M * K + M * N)


def w4a16_flops(shape: tuple[int, int, int], dtype: torch.dtype) -> int:
    M, N, K = shape
    return 2 * M * N * K


def _make_inputs(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> tuple:
    """Random codes, scales and zeros (the kernel is tested on any packed data), plus the dense twin for F.linear."""
    M, N, K = shape
    g = _group(K)
    gen = torch.Generator(device=device).manual_seed(0)
    qweight = torch.randint(0, 256, (N, K // 2), generator=gen, device=device, dtype=torch.int32).to(torch.uint8)
    scales = (0.01 + 0.01 * torch.rand(N, K // g, generator=gen, device=device)).to(torch.float16)
    zeros = torch.randint(6, 10, (N, K // g), generator=gen, device=device).to(torch.float16)
    x = torch.randn(M, K, generator=gen, device=device).to(dtype)
    dense = dequantize_int4(qweight, scales, zeros, g).to(dtype)  # (N, K), for the fp16 F.linear baseline
    return x, qweight, scales, zeros, g, dense


def _kernel(x, qweight, scales, zeros, g, dense):
    return w4a16_matmul(x, qweight, scales, zeros, g)


def _reference(x, qweight, scales, zeros, g, dense):
    return w4a16_reference(x, qweight, scales, zeros, g)


def _dense_linear(x, qweight, scales, zeros, g, dense):
    return torch.nn.functional.linear(x, dense)  # the uncompressed weight: what W4A16 competes with


BENCHMARK = Benchmark(
    name="w4a16",
    make_inputs=_make_inputs,
    kernel=_kernel,
    reference=_reference,
    baselines={"F.linear 16-bit": _dense_linear, "dequant+F.linear": _reference},
    bytes_moved=w4a16_bytes,
    flops=w4a16_flops,
    shape_names="(tokens M, out N, in K), group 128",
    # decode at batch 1 and 16 (Llama-2-7B MLP 11008×4096 and attention 4096×4096), then prefill
    shapes=[(1, 11008, 4096), (1, 4096, 4096), (4, 11008, 4096), (16, 11008, 4096), (16, 4096, 4096),
            (512, 11008, 4096), (2048, 4096, 4096)],
    check_shapes=[(1, 96, 256), (5, 64, 256), (33, 80, 128)],
    dtypes=(torch.float16,),
    # the interpreter multiplies unrounded fp32 weights; the reference rounds them to fp16 first (2⁻¹¹)
    tolerance={torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-2), torch.bfloat16: (1e-1, 2e-2)},
)
