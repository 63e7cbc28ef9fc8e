"""The W8A8 kernel against exact integer arithmetic, the dynamic int8 quantizer's error bound, the bench entry."""

from __future__ import annotations

import pytest
import torch

import effref.kernels.w8a8 as w8a8_module
from effref import kernels
from effref.kernels.w8a8 import (
    BENCHMARK,
    GPU_TILES,
    MAX_K,
    quantize_rows_int8,
    tile_grid,
    w8a8_bytes,
    w8a8_linear,
    w8a8_matmul,
    w8a8_reference,
)

needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="Triton is not installed")


def make(M: int, N: int, K: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x_q = torch.randint(-128, 128, (M, K), generator=gen).to(torch.int8)
    w_q = torch.randint(-128, 128, (N, K), generator=gen).to(torch.int8)
    sx = torch.rand(M, generator=gen) + 0.01
    sw = torch.rand(N, generator=gen) + 0.01
    return x_q, w_q, sx, sw


def test_reference_integer_product_is_exact():
    x_q, w_q, _sx, _sw = make(5, 7, 300)
    exact = x_q.long() @ w_q.long().t()  # (5, 7) int64 on the CPU, no floating point at all
    ref = w8a8_reference(x_q, w_q, torch.ones(5), torch.ones(7), torch.float32)
    assert torch.equal(ref.long(), exact)


@needs_triton
@pytest.mark.parametrize("M, N, K", [(1, 64, 128), (33, 80, 200), (16, 16, 32), (65, 130, 257)])
def test_kernel_is_bitwise_equal_to_reference_in_fp32(M, N, K):
    x_q, w_q, sx, sw = make(M, N, K)
    y = w8a8_matmul(x_q, w_q, sx, sw, out_dtype=torch.float32)
    assert torch.equal(y, w8a8_reference(x_q, w_q, sx, sw, torch.float32))


@needs_triton
def test_extreme_codes_do_not_overflow():
    K = 4096
    x_q = torch.full((2, K), -128, dtype=torch.int8)
    w_q = torch.full((3, K), -128, dtype=torch.int8)
    y = w8a8_matmul(x_q, w_q, torch.ones(2), torch.ones(3), out_dtype=torch.float32)
    assert (y == 128 * 128 * K).all()  # 67,108,864: exact in int32 and in fp32 (a power of two)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_round_once(dtype):
    x_q, w_q, sx, sw = make(9, 40, 96)
    sx = sx * 1e-3  # keep |y| inside the fp16 range
    y = w8a8_matmul(x_q, w_q, sx, sw, out_dtype=dtype)
    ulp = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
    torch.testing.assert_close(y.float(), w8a8_reference(x_q, w_q, sx, sw, torch.float32), atol=0, rtol=ulp)


def test_row_quantizer_error_is_at_most_half_a_step():
    t = torch.randn(20, 64) * torch.logspace(-3, 2, 20)[:, None]  # rows of very different magnitude
    t[3] = 0.0
    codes, scale = quantize_rows_int8(t)
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    assert torch.equal(scale[3], torch.tensor(1.0)) and (codes[3] == 0).all()
    err = (codes.float() * scale[:, None] - t).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()
    assert torch.equal(codes.abs().amax(dim=1)[t.abs().amax(1) > 0], torch.full((19,), 127, dtype=torch.int8))


@needs_triton
def test_w8a8_linear_within_the_int8_error_bound():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 128, generator=gen)
    w = 0.05 * torch.randn(48, 128, generator=gen)
    w_q, w_scale = quantize_rows_int8(w)
    y = w8a8_linear(x, w_q, w_scale)
    assert y.shape == (2, 6, 48) and y.dtype == torch.float32
    x2 = x.reshape(12, 128)
    _, x_scale = quantize_rows_int8(x2)
    # Σ (x − x̂) w + x̂ (w − ŵ):  |·| ≤ a/2 · Σ|w| + b/2 · Σ|x̂|, with x̂ ≤ |x| + a/2
    bound = x_scale[:, None] / 2 * w.abs().sum(1)[None, :] + \
        (x2.abs() + x_scale[:, None] / 2).sum(1)[:, None] * w_scale[None, :] / 2
    err = (y.reshape(12, 48) - x2 @ w.t()).abs()
    assert (err <= bound + 1e-5).all()
    assert err.max() > 0  # it really is quantized


BAD = [
    ("x float", {"x_q": torch.ones(2, 64)}, ValueError, r"x_q must be a 2-D int8 tensor"),
    ("w 3-D", {"w_q": torch.ones(1, 8, 64, dtype=torch.int8)}, ValueError, r"w_q must be a 2-D int8"),
    ("K mismatch", {"w_q": torch.ones(8, 32, dtype=torch.int8)}, ValueError, r"disagree on K"),
    ("x_scale length", {"x_scale": torch.ones(3)}, ValueError, r"x_scale must be a float32 vector of length 2"),
    ("w_scale half", {"w_scale": torch.ones(8).half()}, ValueError, r"w_scale must be a float32 vector"),
    ("out int", {"out_dtype": torch.int32}, TypeError, r"out_dtype=torch\.int32 is not supported"),
    ("scale list", {"x_scale": [1.0, 1.0]}, TypeError, r"x_scale must be a torch\.Tensor"),
    ("w on meta", {"w_q": torch.ones(8, 64, dtype=torch.int8, device="meta")}, ValueError, r"w_q is on meta"),
]


@needs_triton
@pytest.mark.parametrize("case, change, error, message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_are_refused_with_a_fix(case, change, error, message):
    args = {"x_q": torch.ones(2, 64, dtype=torch.int8), "w_q": torch.ones(8, 64, dtype=torch.int8),
                "x_scale": torch.ones(2), "w_scale": torch.ones(8), "out_dtype": torch.float16}
    with pytest.raises(error, match=message):
        w8a8_matmul(**{**args, **change})


def test_k_limit_is_the_int32_limit():
    assert MAX_K * 128 ** 2 < 2 ** 31 <= (MAX_K + 1) * 128 ** 2


@pytest.mark.parametrize("shape", [(4096, 4096, 4096), (33, 80, 200)])
def test_roofline_bytes_match_the_tensors(shape):
    x_q, w_q, sx, sw, _x16, _w16 = BENCHMARK.make_inputs(shape, torch.float16, torch.device("cpu"))
    y_bytes = shape[0] * shape[1] * 2
    assert w8a8_bytes(shape, torch.float16) == x_q.nbytes + w_q.nbytes + sx.nbytes + sw.nbytes + y_bytes


@needs_triton
def test_roofline_uses_the_int8_peak():
    # a fake clock: the kernel takes 1 ms. The shape is compute-bound, so the roof is FLOPs / int8 peak, and an
    # int8 peak twice the 16-bit one halves the % of roofline a 16-bit roof would claim.
    from effref.kernels.bench import DevicePeak, time_one

    shape = (64, 64, 64)
    peak = DevicePeak("test", hbm_gbps=1e6, tflops_16bit=1e-3, tflops_fp32=1e-4, tops_int8=2e-3)
    record = time_one(BENCHMARK, shape, torch.float16, peak, device=torch.device("cpu"),
                      timer=lambda fn: (fn(), 1.0)[1])
    flops = 2 * 64 * 64 * 64
    assert BENCHMARK.compute == "int8"
    assert record["pct_roofline"] == pytest.approx(100 * (flops / 2e9) / 1e-3)


@needs_triton
def test_kernel_compiles_for_a_hopper_gpu_at_the_largest_autotuned_tile_and_the_thin_one(compile_for_gpu):
    largest = max(GPU_TILES, key=lambda t: t[0] * t[1] * t[2])
    m, n, k, warps, stages = largest
    job = {"module": "effref.kernels.w8a8", "kernel": "_w8a8_kernel", "pointer": "*i8",
           "types": {"sa_ptr": "*fp32", "sb_ptr": "*fp32", "y_ptr": "*fp16"}}
    out = compile_for_gpu(
        job | {"constexprs": {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k},
               "options": {"num_warps": warps, "num_stages": stages}},
        job | {"constexprs": {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128},
               "options": {"num_warps": 4, "num_stages": 3}})
    assert out.count("compiled _w8a8_kernel") == 2


@needs_triton
@pytest.mark.parametrize("tile", GPU_TILES)
def test_every_autotuning_candidate_computes_the_exact_product(tile):
    m, n, k, warps, stages = tile
    x_q, w_q, sx, sw = make(70, 130, 300)  # ragged in every dimension against every tile
    y = torch.empty(70, 130)
    w8a8_module._w8a8_kernel[tile_grid(70, 130)({"BLOCK_M": m, "BLOCK_N": n})](
        x_q, w_q, sx, sw, y, 70, 130, 300, x_q.stride(0), w_q.stride(0), y.stride(0),
        BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=warps, num_stages=stages)
    assert torch.equal(y, w8a8_reference(x_q, w_q, sx, sw, torch.float32))


@needs_triton
def test_the_autotuner_times_every_candidate_and_launches_the_fastest(monkeypatch):
    timed = []

    def fake_bench(kernel_call, quantiles):  # a GPU timer stand-in: the interpreter runs on the CPU
        kernel_call()
        timed.append(len(timed))
        return [float(len(GPU_TILES) - len(timed))] * 3  # the last candidate looks fastest

    tuner = w8a8_module._w8a8_autotuned
    monkeypatch.setattr(tuner, "_do_bench", fake_bench)
    monkeypatch.setattr(tuner, "cache", {})
    x_q, w_q, sx, sw = make(65, 48, 64)
    y = torch.empty(65, 48)
    tuner[tile_grid(65, 48)](x_q, w_q, sx, sw, y, 65, 48, 64, x_q.stride(0), w_q.stride(0), y.stride(0))
    assert len(timed) == len(GPU_TILES)
    assert tuner.best_config.kwargs["BLOCK_M"] == GPU_TILES[-1][0]
    assert torch.equal(y, w8a8_reference(x_q, w_q, sx, sw, torch.float32))
