"""The W4A16 kernel against a from-definition dequantization, both launch paths, and the bench entry.

Under the Triton interpreter the kernel multiplies in fp32, which is exact for fp32 inputs: those cases
use tight tolerances. For fp16/bf16 activations the reference rounds the dequantized weight to x's dtype
first (as the GPU kernel does), the interpreter does not: the gap is one 16-bit rounding of each weight.
"""

from __future__ import annotations

import pytest
import torch

from effref import kernels
from effref.kernels._runtime import decode_split_k
from effref.kernels.w4a16 import (
    BENCHMARK,
    dequantize_int4,
    unpack_int4,
    w4a16_bytes,
    w4a16_matmul,
    w4a16_reference,
)

needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="Triton is not installed")


def make(M: int, N: int, K: int, group: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)  # (N, K)
    qweight = codes[:, 0::2] | (codes[:, 1::2] << 4)  # (N, K/2) low nibble = even k, by hand
    scales = (0.01 + 0.05 * torch.rand(N, K // group, generator=gen)).half()  # (N, K/g)
    zeros = (15 * torch.rand(N, K // group, generator=gen)).half()  # fractional zeros are allowed
    x = torch.randn(M, K, generator=gen).to(dtype)
    return x, codes, qweight, scales, zeros


def test_dequantize_matches_the_formula_element_by_element():
    _, codes, qweight, scales, zeros = make(1, 3, 64, 32)
    w = dequantize_int4(qweight, scales, zeros, 32)
    for n in range(3):
        for k in range(64):
            expected = (float(codes[n, k]) - float(zeros[n, k // 32])) * float(scales[n, k // 32])
            assert w[n, k].item() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert torch.equal(unpack_int4(qweight), codes)


CASES = [  # (M, N, K, group, path, split_k)
    (1, 96, 256, 128, "auto", None),  # batch 1, decode
    (16, 64, 256, 64, "decode", 2),  # split-K with atomic adds, two groups per split
    (3, 40, 384, 64, "decode", 4),  # K tiles (6) not a multiple of the split (4): one split is short
    (33, 80, 128, 128, "auto", None),  # prefill, rows and columns not multiples of the tile
    (20, 48, 256, 32, "prefill", None),  # small groups: several groups per tile row
]


@needs_triton
@pytest.mark.parametrize("M, N, K, group, path, split_k", CASES)
def test_fp32_kernel_matches_dense_matmul(M, N, K, group, path, split_k):
    x, codes, qweight, scales, zeros = make(M, N, K, group)
    y = w4a16_matmul(x, qweight, scales, zeros, group, path=path, split_k=split_k)
    dense = (codes.double() - zeros.double().repeat_interleave(group, 1)) * scales.double().repeat_interleave(
        group, 1)  # (N, K) written independently of dequantize_int4
    torch.testing.assert_close(y.double(), x.double() @ dense.t(), atol=1e-4, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_half_precision_close_to_reference(dtype, atol, path):
    x, _, qweight, scales, zeros = make(5, 64, 256, 128, dtype)
    y = w4a16_matmul(x, qweight, scales, zeros, 128, path=path)
    assert y.dtype == dtype and y.shape == (5, 64)
    torch.testing.assert_close(y.float(), w4a16_reference(x, qweight, scales, zeros, 128).float(),
                               atol=atol, rtol=2e-2)


@needs_triton
def test_leading_dimensions_and_strided_x():
    x, _, qweight, scales, zeros = make(12, 32, 128, 64)
    x3 = x.view(3, 4, 128)
    y = w4a16_matmul(x3, qweight, scales, zeros, 64)
    assert y.shape == (3, 4, 32)
    torch.testing.assert_close(y, w4a16_reference(x3, qweight, scales, zeros, 64), atol=1e-4, rtol=1e-5)
    wide = torch.randn(12, 256)[:, :128]  # row stride 256: used in place
    torch.testing.assert_close(w4a16_matmul(wide, qweight, scales, zeros, 64),
                               w4a16_reference(wide, qweight, scales, zeros, 64), atol=1e-4, rtol=1e-5)


@needs_triton
def test_layout_agrees_with_the_quantization_package():
    basics = pytest.importorskip("effref.quantization.basics", reason="effref.quantization.basics not written yet")
    codes = torch.randint(0, 16, (4, 64), dtype=torch.uint8)
    packed = basics.pack(codes, 4).reshape(4, 32)
    assert torch.equal(unpack_int4(packed), codes), "kernel layout: low nibble = even k, row-major (N, K/2)"


# --- bad inputs ------------------------------------------------------------------------------------------------

def _ok():
    x, _, q, s, z = make(2, 32, 128, 64)
    return {"x": x, "qweight": q, "scales": s, "zeros": z, "group_size": 64}


BAD = [
    ("x int", {"x": torch.ones(2, 128, dtype=torch.int32)}, TypeError, r"x\.dtype=torch\.int32"),
    ("qweight int8", {"qweight": torch.zeros(32, 64, dtype=torch.int8)}, ValueError, r"2-D uint8"),
    ("K mismatch", {"x": torch.ones(2, 100)}, ValueError, r"last dimension must be K = 2 · 64 = 128"),
    ("group not pow2", {"group_size": 48}, ValueError, r"group_size=48 must be a power of two ≥ 32"),
    ("group too small", {"group_size": 16}, ValueError, r"group_size=16"),
    ("group not dividing", {"group_size": 256}, ValueError, r"divides K=128"),
    ("scales shape", {"scales": torch.ones(32, 1).half()}, ValueError, r"scales\.shape=\(32, 1\) must be"),
    ("zeros int", {"zeros": torch.ones(32, 2, dtype=torch.int32)}, TypeError, r"zeros\.dtype=torch\.int32"),
    ("bad path", {"path": "gemv"}, ValueError, r"path='gemv' is not known"),
    ("bad split", {"split_k": 0}, ValueError, r"split_k=0 must be a positive integer"),
    ("grad", {"x": torch.ones(2, 128, requires_grad=True)}, RuntimeError, r"no backward pass"),
    ("scales on meta", {"scales": torch.ones(32, 2, device="meta")}, ValueError, r"scales is on meta"),
]


@needs_triton
@pytest.mark.parametrize("case, change, error, message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_are_refused_with_a_fix(case, change, error, message):
    args = {**_ok(), **change}
    with pytest.raises(error, match=message):
        w4a16_matmul(**args)


# --- the bench entry -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1024, 2048), (33, 80, 128)])
def test_roofline_bytes_count_packed_weight_metadata_and_activations(shape):
    x, qweight, scales, zeros, g, dense = BENCHMARK.make_inputs(shape, torch.float16, torch.device("cpu"))
    y_bytes = shape[0] * shape[1] * 2
    assert w4a16_bytes(shape, torch.float16) == x.nbytes + qweight.nbytes + scales.nbytes + zeros.nbytes + y_bytes
    assert torch.equal(dense, dequantize_int4(qweight, scales, zeros, g).half())




@pytest.mark.parametrize("n_tiles, k_tiles, sm_count, expected", [
    (344, 32, 132, 1),  # 11008 rows in 32-row tiles: 2.6 programs per SM already, no split
    (264, 32, 132, 1),  # exactly two per SM
    (128, 32, 132, 5),  # 4096 rows: split until ~4 programs per SM (640)
    (2, 4, 132, 4),  # never more splits than K tiles
    (1, 1, 132, 1),
])
def test_decode_split_k_splits_only_when_the_columns_cannot_fill_the_gpu(n_tiles, k_tiles, sm_count, expected):
    assert decode_split_k(n_tiles, k_tiles, sm_count) == expected


@needs_triton
@pytest.mark.parametrize("split_k, out", [(1, "*fp16"), (4, "*fp32")])  # direct store, or fp32 atomics
def test_decode_kernel_compiles_for_a_hopper_gpu(compile_for_gpu, split_k, out):
    report = compile_for_gpu(
        {"module": "effref.kernels.w4a16", "kernel": "_w4a16_kernel", "pointer": "*fp16",
         "types": {"qw_ptr": "*u8", "y_ptr": out},
         "constexprs": {"GROUP": 128, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": split_k,
                        "UPCAST": False, "IEEE": False},
         "options": {"num_warps": 4, "num_stages": 4}})
    assert "compiled _w4a16_kernel" in report
