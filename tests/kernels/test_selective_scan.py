"""The selective-scan kernel against Mamba's eager recurrence (effref.alternatives.mamba), under the interpreter
on CPU: outputs, the carried state, a state passed in, odd widths and state sizes, and the refusals."""

import pytest
import torch

from effref import kernels
from effref.alternatives import selective_scan_parallel
from effref.kernels.selective_scan import BENCHMARK, selective_scan, selective_scan_reference

needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="Triton is not installed")
make = BENCHMARK.make_inputs


@needs_triton
@pytest.mark.parametrize("shape", [(2, 9, 24, 16), (1, 5, 7, 3), (3, 1, 1, 1)])
def test_kernel_equals_the_eager_recurrence(shape):
    inputs = make(shape, torch.float32, torch.device("cpu"))
    y, h = selective_scan(*inputs)
    y_ref, h_ref = selective_scan_reference(*inputs)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    assert y.abs().max() > 0.1  # a real signal, not zeros on both sides


@needs_triton
def test_a_carried_state_continues_the_sequence():
    inputs = make((2, 12, 16, 8), torch.float32, torch.device("cpu"))
    u, delta, A, B, C, D = inputs
    y_all, h_all = selective_scan(*inputs)
    y1, h1 = selective_scan(u[:, :5], delta[:, :5], A, B[:, :5], C[:, :5], D)
    y2, h2 = selective_scan(u[:, 5:], delta[:, 5:], A, B[:, 5:], C[:, 5:], D, h0=h1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_all, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2, h_all, rtol=1e-5, atol=1e-5)


@needs_triton
def test_bf16_inputs_are_computed_in_fp32():
    inputs = make((1, 6, 16, 16), torch.bfloat16, torch.device("cpu"))
    y, _ = selective_scan(*inputs)
    assert y.dtype == torch.bfloat16
    y_ref = selective_scan_parallel(*(t.float() for t in inputs))[0]
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)


@needs_triton
def test_refusals_name_the_argument():
    u, delta, A, B, C, D = make((1, 4, 8, 4), torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="B.shape"):
        selective_scan(u, delta, A, B[:, :3], C, D)
    with pytest.raises(ValueError, match="h0.shape"):
        selective_scan(u, delta, A, B, C, D, h0=torch.zeros(1, 8, 5))
    with pytest.raises(TypeError, match="u.dtype"):
        selective_scan(u.double(), delta, A, B, C, D)
    with pytest.raises(RuntimeError, match="no backward"):
        selective_scan(u.requires_grad_(), delta, A, B, C, D)
