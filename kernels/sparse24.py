"""2:4 semi-structured sparse matmul: read half the weight plus 2-bit indices, rebuild the tile in registers.

Paper: the 2:4 pattern of NVIDIA's sparse tensor cores (Mishra et al., 2021, "Accelerating Sparse Deep Neural
Networks", arXiv:2104.08378, §2–3): in every group of 4 consecutive input columns of a weight row at most 2
entries are nonzero, so a row is stored as its K/2 kept values plus, per group, the positions p₀ < p₁ ∈ {0…3}
of the two kept entries. With the values v and indices p of group g of row n,

    W[n, 4g + p₀] = v[n, 2g],   W[n, 4g + p₁] = v[n, 2g + 1],   the other two entries 0,   y = x Wᵀ.

Storage format (ours; the same information as NVIDIA's, in a simpler layout):
- ``values`` (N, K/2), the weight's dtype: the two kept entries of each group, in column order;
- ``meta`` (N, ⌈K/8⌉) uint8: one 4-bit code per group, p₀ in bits 0–1 and p₁ in bits 2–3; two groups per
  byte, the even group g in the low nibble of byte g // 2 and the odd group in the high nibble (the same
  low-first convention as the int4 codes of ``kernels/w4a16.py``). When K/4 is odd the last high nibble is 0.
So the weight costs K/2 values + K/8 bytes per row: 1.125 bytes per weight in fp16 against 2 dense (1.78×
less), 2.125 in fp32 against 4. ``compress_24`` accepts any weight with *at most* two nonzeros per group (a
kept weight may itself be 0, as in the offline SmolLM2's Q4_1-rounded weights); which positions it keeps
comes from ``effref.pruning.masks.nm_mask`` on |W|, the same helper that makes the pruning methods' masks.

Why a kernel. Decoding multiplies a few rows of x by the whole weight, two FLOPs per weight element: the time
is the time to read the weight, and the compressed weight is 44 % smaller (fp16). The kernel loads values and
codes, and for each position p ∈ {0…3} builds the (groups × N) slice W[:, 4g + p] with two selects — no
gather, no interleaving — and multiplies it with the matching strided slice x[:, 4g + p] (the four slices
together are the whole K tile). The tensor cores then multiply the rebuilt dense tile, zeros included, so at
large M (prefill, compute-bound) this kernel does the dense amount of work and cannot beat cuBLAS; there only
the sparse tensor cores (``torch.sparse.to_sparse_semi_structured``, the bench's other baseline), which skip
the zeros in hardware, can give the up-to-2× the pattern was designed for.

Two launch configurations, as in ``kernels/w4a16.py``: decode (M ≤ 16, narrow column blocks and split-K so a
1 × 4096 · 4096 × 4096 product still occupies every SM; partial sums meet by atomic adds in an fp32 buffer)
and prefill (square 64–128 tiles).

Glossary: x (M × K) activations · W (N × K) 2:4 weight · v ``values`` (N × K/2) · p₀, p₁ kept positions
          (``meta``) · g group of 4 inputs, G = K/4 groups · BLOCK_M/N/K tile sizes, BLOCK_K/4 groups per tile
          · SPLIT_K programs sharing one output tile along K.
Left out: NVIDIA's hardware metadata layout and the ``mma.sp`` instructions (our kernel computes on dense
tiles; PyTorch's semi-structured tensors are the baseline that uses them), tuned GPU configurations, N:M
patterns other than 2:4, and a backward pass.
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
from effref.pruning.masks import PruneConfig, nm_mask

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PATHS = ("auto", "decode", "prefill")
DECODE_MAX_ROWS = 16  # up to this many rows (tokens) the decode path is used
PATTERN = PruneConfig(nm="2:4")  # the shape checks of the pruning package: in_features % 4 == 0


# --- the storage format, in PyTorch -----------------------------------------------------------------------------

def meta_columns(K: int) -> int:
    """Bytes of ``meta`` per row: one 4-bit code per group of 4 inputs, two codes per byte."""
    return (K // 4 + 1) // 2


def compress_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4 weight (N, K) into ``(values (N, K/2) in w's dtype, meta (N, ⌈K/8⌉) uint8)``; exact.

    Every group of 4 consecutive inputs of a row may hold at most two nonzeros; the first offending row and
    group are named otherwise. Prune first, e.g. ``magnitude_prune(w, cfg=PruneConfig(nm="2:4"))``.
    """
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"w must be a floating-point torch.Tensor, got "
                        f"{w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}")
    PATTERN.check_shape(w)  # 2-D, in_features divisible by 4
    N, K = w.shape
    w = w.detach()
    pruned = nm_mask(w.abs(), 2, 4)  # (N, K) True at the 2 smallest |w| of each group (ties: lowest index first)
    bad = pruned & (w != 0)  # a nonzero the 2:4 pattern cannot keep
    if bad.any():
        n, k = (int(i) for i in torch.nonzero(bad)[0])
        g = k // 4
        group = [float(v) for v in w[n, 4 * g:4 * g + 4]]
        count = int(bad.reshape(N, K // 4, 4).any(-1).sum())
        raise ValueError(f"w is not 2:4 sparse: row {n}, group {g} (columns {4 * g}–{4 * g + 3}) holds "
                         f"{sum(v != 0 for v in group)} nonzeros {group}, and {count} group(s) in all hold more "
                         "than 2; prune first, e.g. magnitude_prune(w, cfg=PruneConfig(nm='2:4'))")
    kept = ~pruned.reshape(N, K // 4, 4)  # (N, G, 4) exactly two True per group
    values = w.reshape(N, K // 4, 4)[kept].reshape(N, K // 2)  # (N, K/2) column order within each group
    pos = torch.arange(4, device=w.device).expand_as(kept)[kept].reshape(N, K // 4, 2)  # (N, G, 2) p₀ < p₁
    codes = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)  # (N, G) 4-bit code per group
    if codes.shape[1] % 2:
        codes = torch.cat([codes, codes.new_zeros(N, 1)], dim=1)  # pad to an even number of groups
    meta = codes[:, 0::2] | (codes[:, 1::2] << 4)  # (N, ⌈G/2⌉) even group in the low nibble
    return values.contiguous(), meta.contiguous()


def _check_format(values: torch.Tensor, meta: torch.Tensor, K: int | None = None) -> int:
    """Shape and dtype checks of a compressed weight; returns K."""
    if not isinstance(values, torch.Tensor) or values.dim() != 2:
        raise ValueError(f"values must be a 2-D tensor (N, K/2) of kept weights, got "
                         f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}")
    implied = 2 * values.shape[1]
    if K is None:
        K = implied
    if isinstance(K, bool) or not isinstance(K, int) or K != implied or K % 4:
        raise ValueError(f"K={K!r} must equal 2 · values.shape[1] = {implied} and be divisible by 4 (2 of every "
                         "4 inputs are stored); pass the in_features of the dense weight")
    expected = (values.shape[0], meta_columns(K))
    if not isinstance(meta, torch.Tensor) or meta.dtype != torch.uint8 or tuple(meta.shape) != expected:
        got = f"{meta.dtype} {tuple(meta.shape)}" if isinstance(meta, torch.Tensor) else type(meta).__name__
        raise ValueError(f"meta must be a uint8 tensor of shape (N, ⌈K/8⌉) = {expected}, got {got}; "
                         "make it with compress_24")
    return K


def unpack_meta(meta: torch.Tensor, K: int) -> torch.Tensor:
    """(N, ⌈K/8⌉) uint8 → (N, K/4, 2) int64 kept positions p₀, p₁ of every group."""
    codes = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(meta.shape[0], -1)[:, :K // 4]  # (N, G)
    return torch.stack([codes & 3, codes >> 2], dim=-1).long()  # (N, G, 2)


def decompress_24(values: torch.Tensor, meta: torch.Tensor, K: int) -> torch.Tensor:
    """The dense (N, K) weight in ``values``' dtype that ``(values, meta)`` stands for; inverse of compress_24."""
    K = _check_format(values, meta, K)
    N = values.shape[0]
    pos = unpack_meta(meta, K)  # (N, G, 2)
    same = pos[..., 0] == pos[..., 1]
    if same.any():
        n, g = (int(i) for i in torch.nonzero(same)[0])
        raise ValueError(f"meta is corrupt: row {n}, group {g} names position {int(pos[n, g, 0])} twice; "
                         "the two kept positions of a group must differ (make meta with compress_24)")
    w = values.new_zeros(N, K // 4, 4)  # (N, G, 4)
    w.scatter_(-1, pos.to(values.device), values.reshape(N, K // 4, 2))
    return w.reshape(N, K)


# --- the kernel -------------------------------------------------------------------------------------------------

@triton.jit
def _sparse24_kernel(
    x_ptr, v_ptr, e_ptr, y_ptr,  # x (M, K), values (N, K/2), meta (N, ⌈K/8⌉) uint8, y (M, N)
    M, N, K, stride_xm, stride_vn, stride_en, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows of x and y
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output channels
    gl = tl.arange(0, BLOCK_K // 4)  # (BLOCK_K/4,) groups inside one K tile
    m_ok, n_ok = rm < M, rn < N
    rm64, rn64 = rm.to(tl.int64), rn.to(tl.int64)
    G = K // 4

    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    first, last = pid_k * per_split, tl.minimum((pid_k + 1) * per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(first, last):
        g = t * (BLOCK_K // 4) + gl  # (BLOCK_K/4,) global group index
        g_ok = g < G  # the last tile may run past K (K is a multiple of 4, not of BLOCK_K)
        w_mask = g_ok[:, None] & n_ok[None, :]  # (BLOCK_K/4, BLOCK_N), the tile is held transposed
        # MEMORY-TRAFFIC: reads BLOCK_N · BLOCK_K/2 kept values (the two loads interleave: one pass over them)
        v_base = v_ptr + rn64[None, :] * stride_vn + 2 * g[:, None]
        v0 = tl.load(v_base, mask=w_mask, other=0.0)  # (BLOCK_K/4, BLOCK_N) value kept at p₀
        v1 = tl.load(v_base + 1, mask=w_mask, other=0.0)  # (BLOCK_K/4, BLOCK_N) value kept at p₁
        # MEMORY-TRAFFIC: reads BLOCK_N · BLOCK_K/8 bytes of codes (each byte serves two groups)
        byte = tl.load(e_ptr + rn64[None, :] * stride_en + (g // 2)[:, None], mask=w_mask, other=0)
        code = (byte.to(tl.int32) >> (4 * (g % 2))[:, None]) & 0xF  # (BLOCK_K/4, BLOCK_N) 4-bit code
        p0, p1 = code & 3, code >> 2
        if UPCAST:  # fp32 weights, or the interpreter (which gets 16-bit arithmetic wrong)
            v0, v1 = v0.to(tl.float32), v1.to(tl.float32)
        zero = tl.zeros_like(v0)
        x_base = x_ptr + rm64[:, None] * stride_xm + 4 * g[None, :]
        x_mask = m_ok[:, None] & g_ok[None, :]
        for p in tl.static_range(4):
            # rebuild W[:, 4g + p] for the tile: v0 where p₀ = p, v1 where p₁ = p, else 0 (exact: p₀ ≠ p₁)
            w_p = tl.where(p0 == p, v0, zero) + tl.where(p1 == p, v1, zero)  # (BLOCK_K/4, BLOCK_N)
            # MEMORY-TRAFFIC: reads BLOCK_M · BLOCK_K/4 activations (from L2 after the first column block)
            x_p = tl.load(x_base + p, mask=x_mask, other=0.0)  # (BLOCK_M, BLOCK_K/4) x[:, 4g + p]
            if UPCAST:
                x_p = x_p.to(tl.float32)
            if IEEE:
                acc += tl.dot(x_p, w_p, input_precision="ieee")  # no TF32 for fp32 inputs
            else:
                acc += tl.dot(x_p, w_p)  # (BLOCK_M, BLOCK_N), fp32 accumulation

    y_ptrs = y_ptr + rm64[:, None] * stride_ym + rn64[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        # MEMORY-TRAFFIC: writes BLOCK_M · BLOCK_N outputs once, rounded from fp32 to y's dtype
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:  # y is an fp32 buffer that the SPLIT_K programs of this tile add into
        tl.atomic_add(y_ptrs, acc, mask=mask)


def _config(M: int, N: int, K: int, path: str, split_k: int | None, block_k: int | None) -> dict:
    """Tile sizes for one launch. GPU values are sensible defaults, untuned; the interpreter wants few programs."""
    if kernels.INTERPRETED:
        cfg = {"BLOCK_M": max(16, min(next_power_of_2(M), 64)), "BLOCK_N": max(16, min(next_power_of_2(N), 128)),
               "BLOCK_K": max(64, min(next_power_of_2(K), 512)), "SPLIT_K": 1, "num_warps": 4}
    elif path == "decode":
        cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3}
        cfg["SPLIT_K"] = decode_split_k(math.ceil(N / cfg["BLOCK_N"]), math.ceil(K / cfg["BLOCK_K"]))
    else:
        cfg = {"BLOCK_M": 128 if M >= 128 else 64, "BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 1,
               "num_warps": 8, "num_stages": 3}
    if split_k is not None:
        cfg["SPLIT_K"] = split_k
    if block_k is not None:
        cfg["BLOCK_K"] = block_k
    return cfg


def sparse24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, path: str = "auto",
                    split_k: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """``x @ Wᵀ`` for x (..., K) and a compressed 2:4 weight ``(values, meta)`` from ``compress_24``; (..., N).

    ``path`` picks the decode configuration (≤ 16 rows, split-K) or the prefill one; ``auto`` decides from the
    number of rows. ``split_k`` and ``block_k`` (a power of two ≥ 64) override the tiling (for tests).
    Forward only; the codes in ``meta`` are trusted (``decompress_24`` validates them).
    """
    require_triton("sparse24")
    for name, t in (("x", x), ("values", values), ("meta", meta)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x.dtype={x.dtype} is not supported; convert with .half(), .bfloat16() or .float()")
    if values.dtype != x.dtype:
        raise TypeError(f"values.dtype={values.dtype} must equal x.dtype={x.dtype}; convert with "
                        "values.to(x.dtype)")
    K = _check_format(values, meta)
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"x.shape={tuple(x.shape) if x.dim() else ()} does not match values.shape="
                         f"{tuple(values.shape)}: x's last dimension must be K = 2 · {values.shape[1]} = {K}")
    if path not in PATHS:
        raise ValueError(f"path={path!r} is not known; use one of {PATHS}")
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k={split_k!r} must be a positive integer or None (automatic)")
    if block_k is not None and (isinstance(block_k, bool) or not isinstance(block_k, int) or block_k < 64
                                or block_k & (block_k - 1)):
        raise ValueError(f"block_k={block_k!r} must be a power of two ≥ 64 (16 groups of 4), or None (automatic)")
    if torch.is_grad_enabled() and (x.requires_grad or values.requires_grad):
        raise RuntimeError("sparse24_matmul has no backward pass, but an input requires grad; call it under "
                           "torch.no_grad(), or train with sparse24_reference")
    check_same_device("x", x, values=values, meta=meta)
    check_device("x", x)

    N = values.shape[0]
    x2d = as_rows(x, K)  # (M, K)
    M = x2d.shape[0]
    path = ("decode" if M <= DECODE_MAX_ROWS else "prefill") if path == "auto" else path
    cfg = _config(M, N, K, path, split_k, block_k)
    split = cfg["SPLIT_K"]
    y2d = split_k_output(M, N, split, x)  # (M, N)
    if M == 0 or N == 0:
        return y2d.to(x.dtype).reshape(*x.shape[:-1], N)
    values, meta = values.contiguous(), meta.contiguous()
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), split)
    _sparse24_kernel[grid](x2d, values, meta, y2d, M, N, K, x2d.stride(0), values.stride(0), meta.stride(0),
                           y2d.stride(0), UPCAST=kernels.INTERPRETED or x.dtype == torch.float32,
                           IEEE=x.dtype == torch.float32 and not kernels.INTERPRETED, **cfg)
    return y2d.to(x.dtype).reshape(*x.shape[:-1], N)


def sparse24_reference(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Decompress, then one ``F.linear`` with fp32 accumulation: the kernel's numerics in eager PyTorch.

    Traffic when timed: reads values and meta, writes and re-reads a dense N·K copy of the weight.
    """
    w = decompress_24(values, meta, 2 * values.shape[1])  # (N, K) in values' dtype
    return torch.nn.functional.linear(x.float(), w.float()).to(x.dtype)  # (..., N)


# --- the bench entry ------------------------------------------------------------------------------------------
# shape = (M, N, K): M tokens, an N × K 2:4 weight, fp16 weight and activations

def sparse24_bytes(shape: tuple[int, int, int], dtype: torch.dtype) -> int:
    """Ideal traffic: N·K/2 values + N·⌈K/8⌉ code bytes (4 bits per group of 4) + x read once + y written once."""
    M, N, K = shape
    size = torch.empty((), dtype=dtype).element_size()
    return size * N * K // 2 + N * meta_columns(K) + size * (M * K + M * N)


def sparse24_flops(shape: tuple[int, int, int], dtype: torch.dtype) -> int:
    """What the kernel issues: a dense 2·M·N·K (the rebuilt tiles are multiplied zeros included)."""
    M, N, K = shape
    return 2 * M * N * K


SEMI_STRUCTURED = "2:4 tensor cores"  # the baseline name; present only when compiled for a GPU
_semi_possible = not kernels.INTERPRETED and hasattr(torch.sparse, "to_sparse_semi_structured")


def _make_inputs(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> tuple:
    """A random weight, magnitude-pruned to 2:4 by the pruning package's helper, compressed; plus dense twins."""
    M, N, K = shape
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(N, K, generator=gen, device=device) / math.sqrt(K)  # (N, K)
    dense = w.masked_fill(nm_mask(w.abs(), 2, 4), 0).to(dtype)  # (N, K) exactly 2:4
    values, meta = compress_24(dense)
    x = torch.randn(M, K, generator=gen, device=device).to(dtype)  # (M, K)
    semi: torch.Tensor | Exception | None = None
    if _semi_possible and device.type == "cuda":  # never on CPU: --check there must not touch it
        try:
            semi = torch.sparse.to_sparse_semi_structured(dense)
        except (RuntimeError, NotImplementedError) as exc:  # e.g. the small check shapes: kept for the message
            semi = exc
    return x, values, meta, dense, semi


def _kernel(x, values, meta, dense, semi):
    return sparse24_matmul(x, values, meta)


def _reference(x, values, meta, dense, semi):
    return sparse24_reference(x, values, meta)


def _dense_linear(x, values, meta, dense, semi):
    return torch.nn.functional.linear(x, dense)  # the same weight stored densely: what 2:4 competes with


def _semi_linear(x, values, meta, dense, semi):
    if semi is None or isinstance(semi, Exception):
        raise RuntimeError(f"torch.sparse.to_sparse_semi_structured refused this {dense.dtype} "
                           f"{tuple(dense.shape)} weight ({semi}); 2:4 tensor cores need a CUDA GPU of compute "
                           "capability ≥ 8.0, fp16/bf16, and weight dimensions that are multiples of 64")
    return torch.nn.functional.linear(x, semi)  # cuSPARSELt or CUTLASS sparse tensor cores (x padded to ≥ 8 rows)


BENCHMARK = Benchmark(
    name="sparse24",
    make_inputs=_make_inputs,
    kernel=_kernel,
    reference=_reference,
    baselines={"F.linear dense": _dense_linear, **({SEMI_STRUCTURED: _semi_linear} if _semi_possible else {})},
    bytes_moved=sparse24_bytes,
    flops=sparse24_flops,
    shape_names="(tokens M, out N, in K), 2:4 weight",
    # decode at batch 1, 8 and 16 (Llama-2-7B attention 4096×4096 and MLP 11008×4096), then a 2048-token prefill
    shapes=[(1, 4096, 4096), (8, 4096, 4096), (16, 4096, 4096), (1, 11008, 4096), (8, 11008, 4096),
            (16, 11008, 4096), (2048, 4096, 4096), (2048, 11008, 4096)],
    check_shapes=[(1, 96, 256), (5, 64, 200), (33, 80, 128)],
    dtypes=(torch.float16,),
    # the interpreter multiplies in fp32, like the reference; 16-bit outputs differ by one rounding of y
    tolerance={torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)},
)
