"""The 2:4 storage format against hand-worked bytes and the pruning package's masks; the kernel against dense matmul.

Weights are made 2:4 by ``magnitude_prune`` with ``PruneConfig(nm="2:4")`` (the pruning package, not the code
under test). Under the Triton interpreter the kernel multiplies in fp32, so fp32 cases are compared tightly with a
float64 dense product; fp16/bf16 cases differ from the reference by the final rounding of y (the interpreter rounds
bf16 toward zero: up to two bf16 ulps).
"""

from __future__ import annotations

import pytest
import torch

from effref import kernels
from effref.kernels.sparse24 import (
    BENCHMARK,
    compress_24,
    decompress_24,
    meta_columns,
    sparse24_bytes,
    sparse24_matmul,
    sparse24_reference,
)
from effref.pruning import PruneConfig, magnitude_prune

needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="Triton is not installed")


def pruned_weight(N: int, K: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w, mask = magnitude_prune(torch.randn(N, K, generator=gen), cfg=PruneConfig(nm="2:4"))
    assert bool((mask.reshape(N, K // 4, 4).sum(-1) == 2).all())
    return w.to(dtype)


# --- the format --------------------------------------------------------------------------------------------------

def test_hand_worked_row():
    w = torch.tensor([[0.0, 3.0, 0.0, 5.0, 7.0, 0.0, 0.0, 0.0, 0.0, 0.0, -2.0, 1.0]])  # K = 12: three groups
    values, meta = compress_24(w)
    assert values.tolist() == [[3.0, 5.0, 7.0, 0.0, -2.0, 1.0]]
    # group 0 keeps positions 1, 3 → code 1 | 3 << 2 = 13; group 1 keeps 0 and (the lowest-index zero left
    # after pruning the two smallest) 3 → 12; group 2 keeps 2, 3 → 2 | 3 << 2 = 14 in the low nibble of byte 1
    assert meta.dtype == torch.uint8 and meta.tolist() == [[13 | 12 << 4, 14]]
    assert torch.equal(decompress_24(values, meta, 12), w)


@pytest.mark.parametrize("N, K", [(8, 64), (5, 36), (1, 4), (16, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_exact_on_magnitude_24_masks(N, K, dtype):
    w = pruned_weight(N, K, dtype)
    values, meta = compress_24(w)
    assert values.shape == (N, K // 2) and values.dtype == dtype
    assert meta.shape == (N, meta_columns(K)) == (N, (K + 7) // 8)
    back = decompress_24(values, meta, K)
    assert back.dtype == dtype and torch.equal(back, w)
    # decode the codes by hand: the nonzeros of each group sit at the two positions its nibble names
    for n in range(N):
        for g in range(K // 4):
            code = (int(meta[n, g // 2]) >> (4 * (g % 2))) & 0xF
            p0, p1 = code & 3, code >> 2
            assert p0 < p1
            assert w[n, 4 * g + p0] == values[n, 2 * g] and w[n, 4 * g + p1] == values[n, 2 * g + 1]
            others = [p for p in range(4) if p not in (p0, p1)]
            assert all(w[n, 4 * g + p] == 0 for p in others)


def test_groups_with_fewer_than_two_nonzeros_are_accepted():
    w = pruned_weight(6, 32)
    w[0, :8] = 0  # whole groups of zeros
    w[3, 5] = 0  # a group with one nonzero left
    w[4] = 0
    values, meta = compress_24(w)
    assert torch.equal(decompress_24(values, meta, 32), w)


def test_not_24_names_the_row_and_group():
    w = pruned_weight(4, 16)
    w[2, 9] = w[2, 8] = w[2, 10] = 1.0  # row 2, group 2: three nonzeros at least
    with pytest.raises(ValueError, match=r"row 2, group 2 \(columns 8–11\) holds [34] nonzeros.*1 group\(s\)"):
        compress_24(w)
    with pytest.raises(ValueError, match=r"not 2:4 sparse: row 0, group 0"):
        compress_24(torch.ones(3, 8))


BAD_FORMAT = [
    ("w 1-D", lambda: compress_24(torch.ones(8)), ValueError, r"must be 2-D"),
    ("w int", lambda: compress_24(torch.ones(2, 8, dtype=torch.int32)), TypeError, r"floating-point"),
    ("K not /4", lambda: compress_24(torch.zeros(2, 6)), ValueError, r"in_features divisible by M=4"),
    ("K mismatch", lambda: decompress_24(torch.ones(2, 4), torch.zeros(2, 1, dtype=torch.uint8), 16), ValueError,
     r"K=16 must equal 2 · values.shape\[1\] = 8"),
    ("meta shape", lambda: decompress_24(torch.ones(2, 8), torch.zeros(2, 1, dtype=torch.uint8), 16), ValueError,
     r"meta must be a uint8 tensor of shape \(N, ⌈K/8⌉\) = \(2, 2\)"),
    ("meta dtype", lambda: decompress_24(torch.ones(2, 4), torch.zeros(2, 1), 8), ValueError, r"uint8"),
    ("meta corrupt", lambda: decompress_24(torch.ones(2, 4), torch.tensor([[0xED], [0xD5]], dtype=torch.uint8), 8),
     ValueError, r"row 1, group 0 names position 1 twice"),
]


@pytest.mark.parametrize("case, call, error, message", BAD_FORMAT, ids=[b[0] for b in BAD_FORMAT])
def test_bad_format_inputs_are_refused(case, call, error, message):
    with pytest.raises(error, match=message):
        call()


# --- the kernel --------------------------------------------------------------------------------------------------

CASES = [  # (M, N, K, path, split_k, block_k)
    (1, 96, 256, "auto", None, None),  # batch 1, decode, one K tile
    (16, 64, 512, "decode", 3, 64),  # split-K with atomic adds over 8 K tiles (one split is short)
    (3, 40, 100, "decode", 2, 64),  # K/4 odd and not a multiple of the tile: masked tail and padded meta
    (33, 80, 128, "auto", None, None),  # prefill, rows and columns not multiples of the tile
    (20, 48, 320, "prefill", None, 128),  # several K tiles, last one partial
]


@needs_triton
@pytest.mark.parametrize("M, N, K, path, split_k, block_k", CASES)
def test_fp32_kernel_matches_dense_matmul(M, N, K, path, split_k, block_k):
    w = pruned_weight(N, K)
    values, meta = compress_24(w)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    y = sparse24_matmul(x, values, meta, path=path, split_k=split_k, block_k=block_k)
    assert y.shape == (M, N) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), x.double() @ w.double().t(), atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_half_precision_close_to_reference(dtype, tol, path):
    w = pruned_weight(64, 256, dtype)
    values, meta = compress_24(w)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = sparse24_matmul(x, values, meta, path=path)
    assert y.dtype == dtype and y.shape == (5, 64)
    ref = sparse24_reference(x, values, meta)
    torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(ref.float(), (x.double() @ w.double().t()).float(), atol=tol, rtol=tol)


@needs_triton
def test_leading_dimensions_and_strided_x():
    values, meta = compress_24(pruned_weight(32, 128))
    x3 = torch.randn(3, 4, 128)
    y = sparse24_matmul(x3, values, meta)
    assert y.shape == (3, 4, 32)
    torch.testing.assert_close(y, sparse24_reference(x3, values, meta), atol=1e-5, rtol=1e-5)
    wide = torch.randn(12, 256)[:, :128]  # row stride 256: used in place
    torch.testing.assert_close(sparse24_matmul(wide, values, meta), sparse24_reference(wide, values, meta),
                               atol=1e-5, rtol=1e-5)
    assert sparse24_matmul(torch.randn(0, 128), values, meta).shape == (0, 32)


def _ok():
    values, meta = compress_24(pruned_weight(32, 128))
    return {"x": torch.randn(2, 128), "values": values, "meta": meta}


BAD = [
    ("x int", {"x": torch.ones(2, 128, dtype=torch.int32)}, TypeError, r"x\.dtype=torch\.int32"),
    ("x not tensor", {"x": [[1.0]]}, TypeError, r"x must be a torch\.Tensor, got list"),
    ("values dtype", {"values": torch.ones(32, 64).half()}, TypeError,
     r"values\.dtype=torch\.float16 must equal x\.dtype=torch\.float32"),
    ("values 1-D", {"values": torch.ones(64)}, ValueError, r"values must be a 2-D tensor"),
    ("K odd groups", {"values": torch.ones(32, 3), "x": torch.ones(2, 6)}, ValueError, r"divisible by 4"),
    ("meta int8", {"meta": torch.zeros(32, 16, dtype=torch.int8)}, ValueError, r"meta must be a uint8 tensor"),
    ("meta shape", {"meta": torch.zeros(32, 32, dtype=torch.uint8)}, ValueError, r"= \(32, 16\), got"),
    ("K mismatch", {"x": torch.ones(2, 100)}, ValueError, r"last dimension must be K = 2 · 64 = 128"),
    ("bad path", {"path": "gemv"}, ValueError, r"path='gemv' is not known"),
    ("bad split", {"split_k": 0}, ValueError, r"split_k=0 must be a positive integer"),
    ("block_k small", {"block_k": 32}, ValueError, r"block_k=32 must be a power of two ≥ 64"),
    ("block_k not pow2", {"block_k": 96}, ValueError, r"block_k=96"),
    ("grad", {"x": torch.ones(2, 128, requires_grad=True)}, RuntimeError, r"no backward pass"),
    ("meta on meta", {"meta": torch.zeros(32, 16, dtype=torch.uint8, device="meta")}, ValueError,
     r"meta is on meta but x is on cpu"),
]


@needs_triton
@pytest.mark.parametrize("case, change, error, message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_are_refused_with_a_fix(case, change, error, message):
    with pytest.raises(error, match=message):
        sparse24_matmul(**{**_ok(), **change})


# --- the bench entry -----------------------------------------------------------------------------------------------

def test_bytes_hand_counted():
    # 4096 × 4096 fp16 at batch 1: values 4096·2048·2 B, codes 4096·512 B (4 bits per group of 4), x and y 8 KiB each
    assert sparse24_bytes((1, 4096, 4096), torch.float16) == 16_777_216 + 2_097_152 + 8_192 + 8_192
    dense_weight = 4096 * 4096 * 2
    assert dense_weight / (16_777_216 + 2_097_152) == pytest.approx(16 / 9)  # 2 bytes vs 1.125 bytes per weight


@pytest.mark.parametrize("shape", [(1, 96, 256), (5, 64, 200)])
def test_bench_inputs_and_bytes_agree_with_the_tensors(shape):
    x, values, meta, dense, semi = BENCHMARK.make_inputs(shape, torch.float16, torch.device("cpu"))
    assert semi is None  # the semi-structured baseline is never built on CPU
    y_bytes = shape[0] * shape[1] * 2
    assert sparse24_bytes(shape, torch.float16) == x.nbytes + values.nbytes + meta.nbytes + y_bytes
    assert torch.equal(decompress_24(values, meta, shape[2]), dense)
    assert set(BENCHMARK.baselines) == {"F.linear dense"} or not kernels.INTERPRETED


def test_semi_structured_baseline_explains_a_refusal():
    from effref.kernels.sparse24 import _semi_linear

    x, values, meta, dense, _ = BENCHMARK.make_inputs((5, 64, 200), torch.float16, torch.device("cpu"))
    with pytest.raises(RuntimeError, match=r"refused this torch.float16 \(64, 200\) weight \(too narrow\).*≥ 8\.0"):
        _semi_linear(x, values, meta, dense, RuntimeError("too narrow"))


@needs_triton
def test_decode_kernel_compiles_for_a_hopper_gpu(compile_for_gpu):
    report = compile_for_gpu(
        {"module": "effref.kernels.sparse24", "kernel": "_sparse24_kernel", "pointer": "*fp16",
         "types": {"e_ptr": "*u8", "y_ptr": "*fp32"},
         "constexprs": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 2, "UPCAST": False, "IEEE": False},
         "options": {"num_warps": 4, "num_stages": 3}})
    assert "compiled _sparse24_kernel" in report
