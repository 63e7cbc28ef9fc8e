"""The WKV kernel against RWKV-4's eager recurrence (effref.alternatives.rwkv), under the interpreter on CPU:
outputs, the state it returns and continues from, keys large enough to need the running maximum, refusals."""

import pytest
import torch

from effref import kernels
from effref.alternatives import wkv_parallel, wkv_recurrent
from effref.kernels.wkv import BENCHMARK, wkv

needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="Triton is not installed")
CPU = torch.device("cpu")


@needs_triton
@pytest.mark.parametrize("shape", [(2, 17, 32), (1, 4, 5), (3, 1, 1)])
def test_kernel_equals_the_eager_recurrence(shape):
    inputs = BENCHMARK.make_inputs(shape, torch.float32, CPU)
    out, state = wkv(*inputs)
    out_ref, state_ref = wkv_recurrent(*inputs)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for mine, ref in zip(state, state_ref):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


@needs_triton
def test_huge_keys_stay_finite_where_plain_exponentials_overflow():
    w, u, k, v = BENCHMARK.make_inputs((1, 8, 16), torch.float32, CPU)
    k = k + 200.0  # e^{k} overflows fp32 (e^{88.7} = max); the running maximum keeps every exponent ≤ 0
    assert torch.isinf(torch.exp(k)).all()
    out, _ = wkv(w, u, k, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, wkv_parallel(w, u, k, v)[0], rtol=1e-4, atol=1e-4)


@needs_triton
def test_a_returned_state_continues_the_sequence_and_the_input_state_is_kept():
    w, u, k, v = BENCHMARK.make_inputs((2, 10, 8), torch.float32, CPU)
    whole, last = wkv(w, u, k, v)
    first, middle = wkv(w, u, k[:, :4], v[:, :4])
    kept = tuple(s.clone() for s in middle)
    rest, end = wkv(w, u, k[:, 4:], v[:, 4:], state=middle)
    torch.testing.assert_close(torch.cat([first, rest], 1), whole, rtol=1e-5, atol=1e-5)
    for mine, ref in zip(end, last):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(middle, kept))


@needs_triton
def test_refusals_name_the_argument():
    w, u, k, v = BENCHMARK.make_inputs((1, 4, 8), torch.float32, CPU)
    with pytest.raises(ValueError, match="w and u"):
        wkv(w[:3], u, k, v)
    with pytest.raises(ValueError, match="k and v"):
        wkv(w, u, k, v[:, :2])
    with pytest.raises(ValueError, match="state"):
        wkv(w, u, k, v, state=(torch.zeros(1, 3),) * 3)
    with pytest.raises(TypeError, match="k must"):
        wkv(w, u, k.long(), v)
