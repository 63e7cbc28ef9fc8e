"""The fused RMSNorm kernel against the definition, PyTorch's own rms_norm, and the promises RMSNorm makes.

On a machine without a GPU these run under the Triton interpreter on CPU tensors; shapes are small and
whole rows fit in one tile, so each launch is a handful of programs.

A measured quirk worth knowing: the interpreter (triton 3.7.1) rounds fp32 → bf16 toward zero where a GPU
rounds to nearest even, so bf16 outputs may differ from the reference by one bf16 ulp (relative 2⁻⁷). The
bf16 tolerance below allows exactly that; fp16 and fp32 are rounded to nearest on both.
"""

from __future__ import annotations

import math

import pytest
import torch

from effref import kernels
from effref.kernels.bench import DevicePeak, match_peak, print_timings, time_one
from effref.kernels.rmsnorm import BENCHMARK, MAX_COLS, rmsnorm, rmsnorm_bytes, rmsnorm_reference

needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="Triton is not installed")
BF16_ULP = 2.0 ** -7  # spacing of bf16 values relative to their magnitude (8 significand bits)


def definition_fp64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. 4 of Zhang & Sennrich, written out in float64: x_i / sqrt(mean_j x_j² + ε) · g_i."""
    xd = x.double()  # (..., n)
    rms = torch.sqrt((xd * xd).sum(dim=-1, keepdim=True) / x.shape[-1] + eps)  # (..., 1)
    return xd / rms * weight.double()  # (..., n)


def make(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=gen)).to(dtype)  # (..., n)  scale ≠ 1 so the RMS matters
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=gen)).to(dtype)  # (n,)
    return x, weight


# --- the reference is right: it agrees with PyTorch's own implementation ------------------------------------

@pytest.mark.skipif(not hasattr(torch.nn.functional, "rms_norm"), reason="torch < 2.4 has no F.rms_norm")
def test_reference_matches_torch_rms_norm():
    x, weight = make((7, 576), torch.float64)
    expected = torch.nn.functional.rms_norm(x, (576,), weight, eps=1e-5)
    ours = rmsnorm_reference(x, weight, eps=1e-5).double()
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)


# --- the kernel is right ------------------------------------------------------------------------------------

SHAPES = [
    (1, 576),  # one token at SmolLM2-135M's width: n is not a power of two
    (37, 576),  # rows not a multiple of the row block
    (4, 3, 100),  # 3-D (batch, time, hidden)
    (8, 1024),  # power-of-two width: no masked columns
    (5, 1),  # a single column: y = sign(x) · g up to ε
]


@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_definition(shape):
    x, weight = make(shape)
    y = rmsnorm(x, weight, eps=1e-6)
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), definition_fp64(x, weight, 1e-6), atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype, rtol", [(torch.bfloat16, BF16_ULP), (torch.float16, 2.0 ** -10)])
@pytest.mark.parametrize("shape", [(37, 576), (2, 3, 100)], ids=lambda s: "x".join(map(str, s)))
def test_half_precision_within_one_ulp_of_reference(shape, dtype, rtol):
    x, weight = make(shape, dtype)
    y = rmsnorm(x, weight)
    assert y.dtype == dtype
    # the reference rounds the same fp32 value once; the kernel may land one ulp away (see module docstring)
    torch.testing.assert_close(y.float(), rmsnorm_reference(x, weight).float(), atol=1e-6, rtol=rtol * 1.01)


@needs_triton
def test_eps_enters_under_the_square_root():
    x, weight = make((5, 576))
    x = 1e-3 * x  # (5, 576)  mean square ~1e-5, comparable to eps: a misplaced eps shows
    torch.testing.assert_close(rmsnorm(x, weight, eps=1e-5).double(), definition_fp64(x, weight, 1e-5),
                               atol=1e-6, rtol=1e-5)


@needs_triton
def test_all_zero_row_stays_finite():
    x, weight = make((3, 576))
    x[1] = 0.0  # 1/RMS would be infinite without eps
    y = rmsnorm(x, weight)
    assert torch.isfinite(y).all() and (y[1] == 0).all()


@needs_triton
def test_mixed_dtypes_fp32_weight_bf16_activations():
    x, _ = make((6, 576), torch.bfloat16)
    _, weight = make((6, 576), torch.float32, seed=1)
    y = rmsnorm(x, weight)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), definition_fp64(x, weight, 1e-6), atol=1e-6, rtol=BF16_ULP * 1.01)


@needs_triton
def test_non_contiguous_inputs():
    transposed = make((576, 12))[0].t()  # (12, 576) with column stride 12: the launcher copies it
    strided_rows = make((10, 1152))[0][:, :576]  # (10, 576) with row stride 1152: used in place
    weight = make((1152,))[1][::2]  # (576,) with stride 2
    for x in (transposed, strided_rows):
        y = rmsnorm(x, weight)
        assert y.shape == x.shape and y.is_contiguous()
        torch.testing.assert_close(y.double(), definition_fp64(x, weight, 1e-6), atol=1e-5, rtol=1e-5)


@needs_triton
def test_scale_invariance():
    # RMSNorm's re-scaling invariance (Zhang & Sennrich): multiplying a row by c > 0 leaves the output
    # unchanged, up to the ε under the root; a tiny ε makes that exact to fp32 rounding even for c = 0.01
    x, weight = make((9, 576))
    c = torch.tensor([0.01, 0.5, 3.0, 250.0, 1.0, 7.0, 0.2, 40.0, 2.0])[:, None]  # (9, 1)
    torch.testing.assert_close(rmsnorm(c * x, weight, eps=1e-12), rmsnorm(x, weight, eps=1e-12),
                               atol=1e-5, rtol=1e-5)


@needs_triton
def test_empty_batch_returns_empty():
    x = torch.empty(0, 3, 576)
    y = rmsnorm(x, torch.ones(576))
    assert y.shape == (0, 3, 576)


# --- bad inputs ---------------------------------------------------------------------------------------------

BAD = [
    ("x list", [[1.0, 2.0]], torch.ones(2), 1e-6, TypeError, r"must be torch\.Tensor"),
    ("x 0-d", torch.tensor(1.0), torch.ones(1), 1e-6, ValueError, r"x\.shape=\(\) has no last dimension"),
    ("x n=0", torch.ones(3, 0), torch.ones(0), 1e-6, ValueError, r"x\.shape=\(3, 0\).*n ≥ 1"),
    ("weight wrong length", torch.ones(2, 576), torch.ones(512), 1e-6, ValueError,
     r"weight\.shape=\(512,\) does not match x\.shape\[-1\]=576; pass a weight of shape \(576,\)"),
    ("weight 2-D", torch.ones(2, 8), torch.ones(1, 8), 1e-6, ValueError, r"weight\.shape=\(1, 8\)"),
    ("x int", torch.ones(2, 8, dtype=torch.int32), torch.ones(8), 1e-6, TypeError,
     r"x\.dtype=torch\.int32 is not supported; convert with \.float\(\)"),
    ("weight float64", torch.ones(2, 8), torch.ones(8, dtype=torch.float64), 1e-6, TypeError,
     r"weight\.dtype=torch\.float64 is not supported"),
    ("weight on meta", torch.ones(2, 8), torch.ones(8, device="meta"), 1e-6, ValueError,
     r"weight is on meta but x is on cpu; move weight with \.to\('cpu'\)"),
    ("eps zero", torch.ones(2, 8), torch.ones(8), 0.0, ValueError, r"eps=0\.0 must be a positive finite"),
    ("eps nan", torch.ones(2, 8), torch.ones(8), math.nan, ValueError, r"eps=nan must be a positive"),
    ("eps string", torch.ones(2, 8), torch.ones(8), "1e-6", ValueError, r"eps='1e-6' must be a positive"),
    ("weight needs grad", torch.ones(2, 8), torch.ones(8, requires_grad=True), 1e-6, RuntimeError,
     r"rmsnorm has no backward pass.*torch\.no_grad\(\)"),
    ("row too wide", torch.ones(1, MAX_COLS + 1), torch.ones(MAX_COLS + 1), 1e-6, ValueError,
     rf"x\.shape\[-1\]={MAX_COLS + 1} exceeds MAX_COLS={MAX_COLS}.*rmsnorm_reference"),
]


@needs_triton
@pytest.mark.parametrize("case, x, weight, eps, error, message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_are_refused_with_a_fix(case, x, weight, eps, error, message):
    with pytest.raises(error, match=message):
        rmsnorm(x, weight, eps)


@needs_triton
def test_cpu_tensor_refused_when_compiling_for_gpu(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    with pytest.raises(ValueError, match=r"x is on cpu, but Triton compiles for the GPU.*INTERPRET=1"):
        rmsnorm(torch.ones(2, 8), torch.ones(8))


# --- the bench entry ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, dtype", [((4096, 576), torch.bfloat16), ((2, 3, 100), torch.float32)])
def test_roofline_bytes_are_one_read_and_one_write(shape, dtype):
    x, weight = BENCHMARK.make_inputs(shape, dtype, torch.device("cpu"))
    y = rmsnorm_reference(x, weight)
    assert rmsnorm_bytes(shape, dtype) == x.nbytes + weight.nbytes + y.nbytes


@needs_triton
def test_bench_arithmetic_with_a_fake_clock(capsys):
    # time_one on CPU with a clock that says: kernel 0.5 ms, every baseline 2 ms; the derived numbers follow
    clock = iter([0.5] + [2.0] * len(BENCHMARK.baselines))
    peak = DevicePeak("test", hbm_gbps=1000, tflops_16bit=100, tflops_fp32=10, tops_int8=200)
    shape = (64, 576)
    record = time_one(BENCHMARK, shape, torch.bfloat16, peak, device=torch.device("cpu"),
                      timer=lambda fn: (fn(), next(clock))[1])
    n_bytes = 2 * 64 * 576 * 2 + 576 * 2
    assert record["bytes"] == n_bytes
    assert record["gbps"] == pytest.approx(n_bytes / 0.5e-3 / 1e9)
    assert record["speedup"] == {name: pytest.approx(4.0) for name in BENCHMARK.baselines}
    # memory-bound: the roofline time is bytes / bandwidth, 4·576·64 FLOPs are nothing at 100 TFLOP/s
    assert record["pct_roofline"] == pytest.approx(100 * (n_bytes / 1e12) / 0.5e-3)
    print_timings([record])
    assert "64×576" in capsys.readouterr().out


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"),
    ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"), ("NVIDIA L4", "L4"), ("Tesla T4", "T4"),
    ("NVIDIA L40S", None), ("NVIDIA A100-SXM4-40GB", None), ("NVIDIA GH200 480GB", None),
])
def test_device_names_find_their_datasheet_row(name, expected):
    peak = match_peak(name)
    assert (peak.name if peak else None) == expected
