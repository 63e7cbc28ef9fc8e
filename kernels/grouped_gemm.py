"""The grouped matrix product of a dropless MoE layer in one Triton launch: every expert's rows times its weight.

Paper: Gale, Narayanan, Young, Zaharia (2023), "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts",
MLSys 2023, arXiv:2211.15841 — §5 (the MoE layer as a block-sparse product whose row blocks each belong to one
expert, so no token is dropped and no expert is padded to a capacity).
Implements, for rows grouped by expert (expert 0's n_0 rows, then expert 1's, …, as ``effref.moe.dropless``
permutes them) and stacked weights W (E, N, K):

    Y[r] = X[r] · W_e(r)ᵀ        where e(r) is the expert whose group holds row r.

The host cuts each group into tiles of BLOCK_M rows that never cross into the next group and writes one small
table (the tile's expert, first row and end row); program (i, j) reads entry i and computes its BLOCK_M × BLOCK_N
block of Y with an ordinary tiled matmul loop over K. Only the last tile of a group is partly masked: the work is
Σ_e ⌈n_e / BLOCK_M⌉ · BLOCK_M rows (``effref.moe.block_sparse_rows``), where a padded batched matmul computes
E · max_e n_e and a loop over experts launches E separate products.
Glossary: X ``rows`` (A, K) · W ``weights`` (E, N, K), PyTorch's (out, in) layout as in ``Experts`` · n_e
          ``group_sizes`` · A = Σ n_e assignments · BLOCK_M, BLOCK_N, BLOCK_K tile sizes.
Left out: the backward products (MegaBlocks' DSD and SDDᵀ kernels), its transposed-index metadata, and fusing
the SwiGLU of the expert MLP into the first product.
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

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _grouped_gemm_kernel(
    x_ptr, w_ptr, y_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)  # the group's end: rows at or past it belong to the next expert
    rows = start + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok, col_ok = rows < end, cols < N
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        k_ok = ks < K
        # MEMORY-TRAFFIC: reads a BLOCK_M × BLOCK_K block of X and a BLOCK_K × BLOCK_N block of W_eᵀ.
        x = tl.load(x_ptr + rows64[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + expert * N * K + cols[None, :] * K + ks[:, None], mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)  # (BLOCK_K, BLOCK_N): W_e is (N, K), read transposed
        if IEEE:  # fp32 on a GPU (no TF32 rounding), and every dtype in the interpreter (its bf16 math is wrong)
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    tl.store(y_ptr + rows64[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def tile_table(group_sizes: list[int], block_m: int) -> tuple[list[int], list[int], list[int]]:
    """(expert, first row, group end) of every BLOCK_M tile, tiles never crossing from one group into the next."""
    experts, starts, ends, offset = [], [], [], 0
    for e, n in enumerate(group_sizes):
        for start in range(offset, offset + n, block_m):
            experts.append(e)
            starts.append(start)
            ends.append(offset + n)
        offset += n
    return experts, starts, ends


def _sizes_or_raise(group_sizes, n_experts: int, n_rows: int) -> list[int]:
    sizes = group_sizes.tolist() if isinstance(group_sizes, torch.Tensor) else list(group_sizes)
    if len(sizes) != n_experts or any(not isinstance(n, int) or n < 0 for n in sizes) or sum(sizes) != n_rows:
        raise ValueError(f"group_sizes={sizes} must hold {n_experts} non-negative ints (one per expert of weights) "
                         f"that add up to rows.shape[0]={n_rows}; use torch.bincount(expert, minlength=E)")
    return sizes


def grouped_matmul(rows: torch.Tensor, weights: torch.Tensor, group_sizes) -> torch.Tensor:
    """Y (A, N) with Y[r] = rows[r] @ weights[e(r)].T, rows grouped by expert in the order of ``group_sizes``."""
    require_triton("grouped_matmul")
    for name, t in (("rows", rows), ("weights", weights)):
        if not isinstance(t, torch.Tensor) or t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be a float32/float16/bfloat16 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if rows.ndim != 2 or weights.ndim != 3 or weights.shape[2] != rows.shape[1]:
        raise ValueError(f"rows must be (A, K) and weights (E, N, K) with the same K, got {tuple(rows.shape)} and "
                         f"{tuple(weights.shape)}")
    if rows.dtype != weights.dtype:
        raise TypeError(f"rows.dtype={rows.dtype} and weights.dtype={weights.dtype} differ; cast one to the other")
    if torch.is_grad_enabled() and (rows.requires_grad or weights.requires_grad):
        raise RuntimeError("grouped_matmul has no backward pass; call it under torch.no_grad(), or train with "
                           "effref.moe.dropless_experts")
    check_device("rows", rows)
    check_same_device("rows", rows, weights=weights)
    n_experts, N, K = weights.shape
    sizes = _sizes_or_raise(group_sizes, n_experts, rows.shape[0])
    y = torch.empty(rows.shape[0], N, dtype=rows.dtype, device=rows.device)  # (A, N)
    if kernels.INTERPRETED:  # few, large programs
        block_m, block_n, block_k = 32, next_power_of_2(N), next_power_of_2(K)
    else:
        block_m, block_n, block_k = 64, 128, 64
    table = tile_table(sizes, block_m)
    if not table[0]:
        return y
    metadata = [torch.tensor(column, dtype=torch.int32, device=rows.device) for column in table]
    grid = (len(table[0]), triton.cdiv(N, block_n))
    _grouped_gemm_kernel[grid](rows.contiguous(), weights.contiguous(), y, *metadata, N, K,
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                               IEEE=rows.dtype == torch.float32 or kernels.INTERPRETED)
    return y


def grouped_matmul_loop(rows: torch.Tensor, weights: torch.Tensor, group_sizes) -> torch.Tensor:
    """The reference: one ordinary matmul per expert group, as ``effref.moe.dropless_experts`` computes."""
    sizes = _sizes_or_raise(group_sizes, weights.shape[0], rows.shape[0])
    return torch.cat([group @ weights[e].T for e, group in enumerate(rows.split(sizes))])


def grouped_matmul_padded(rows: torch.Tensor, weights: torch.Tensor, group_sizes) -> torch.Tensor:
    """The fixed-shape alternative: every group padded to the largest, one batched matmul over (E, max n_e, K)."""
    sizes = _sizes_or_raise(group_sizes, weights.shape[0], rows.shape[0])
    padded = torch.nn.utils.rnn.pad_sequence(list(rows.split(sizes)), batch_first=True)  # (E, max n_e, K)
    out = padded @ weights.transpose(1, 2)  # (E, max n_e, N)
    return torch.cat([out[e, :n] for e, n in enumerate(sizes)])


def _make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple:
    n_experts, n_rows, K, N = shape
    gen = torch.Generator(device=device).manual_seed(0)
    skew = torch.rand(n_experts, generator=gen, device=device) ** 3  # unequal loads, as a real router gives
    expert = torch.multinomial(skew + 0.05, n_rows, replacement=True, generator=gen)  # (A,)
    sizes = torch.bincount(expert, minlength=n_experts).tolist()
    rows = torch.randn(n_rows, K, generator=gen, device=device).to(dtype)  # (A, K)
    weights = (torch.randn(n_experts, N, K, generator=gen, device=device) / K ** 0.5).to(dtype)  # (E, N, K)
    return rows, weights, sizes


def grouped_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n_experts, n_rows, K, N = shape
    return torch.empty((), dtype=dtype).element_size() * (n_rows * K + n_experts * N * K + n_rows * N)


def grouped_flops(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    _, n_rows, K, N = shape
    return 2 * n_rows * K * N


BENCHMARK = Benchmark(
    name="grouped_gemm",
    make_inputs=_make_inputs,
    kernel=grouped_matmul,
    reference=grouped_matmul_loop,
    baselines={"loop over experts": grouped_matmul_loop, "padded bmm": grouped_matmul_padded},
    bytes_moved=grouped_bytes,
    flops=grouped_flops,
    shape_names="(experts, assignments, K, N)",
    # Mixtral-8x7B's first expert product (4096 -> 14336) for 4096 tokens × top-2, and a 64-expert layer
    shapes=[(8, 8192, 4096, 14336), (64, 8192, 2048, 1024)],
    check_shapes=[(4, 70, 24, 40), (3, 5, 16, 8)],
    dtypes=(torch.bfloat16, torch.float32),
    tolerance={torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2)},
)
