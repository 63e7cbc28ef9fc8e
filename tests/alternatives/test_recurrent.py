"""The linear scans against the closed form of the recurrence, and the shared generation and file handling."""

import pytest
import torch

from effref.alternatives.recurrent import scan_parallel, scan_sequential

pytestmark = pytest.mark.usefixtures("one_thread")


def closed_form(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """h_t = Σ_{s ≤ t} (Π_{s < r ≤ t} a_r) b_s + (Π_{r ≤ t} a_r) h0, in float64, term by term."""
    a, b = a.double(), b.double()
    T = a.shape[1]
    states = []
    for t in range(T):
        h = torch.zeros_like(b[:, 0]) if h0 is None else a[:, :t + 1].prod(1) * h0.double()
        for s in range(t + 1):
            h = h + a[:, s + 1:t + 1].prod(1) * b[:, s]
        states.append(h)
    return torch.stack(states, 1)


@pytest.mark.parametrize("T", [1, 2, 3, 8, 13])
@pytest.mark.parametrize("with_h0", [False, True])
def test_both_scans_equal_the_closed_form(T, with_h0):
    g = torch.Generator().manual_seed(T)
    a = torch.rand(2, T, 3, 4, generator=g) * 1.5  # some decays above 1: the order of products matters
    b = torch.randn(2, T, 3, 4, generator=g)
    h0 = torch.randn(2, 3, 4, generator=g) if with_h0 else None
    expected = closed_form(a, b, h0).float()
    torch.testing.assert_close(scan_sequential(a, b, h0), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scan_parallel(a, b, h0), expected, rtol=1e-5, atol=1e-5)


def test_parallel_scan_gradients_equal_the_loop():
    g = torch.Generator().manual_seed(0)
    a0, b0, h00 = torch.rand(2, 37, 5, generator=g), torch.randn(2, 37, 5, generator=g), torch.randn(2, 5, generator=g)
    grads = []
    for scan in (scan_sequential, scan_parallel):
        a, b, h0 = (t.clone().requires_grad_() for t in (a0, b0, h00))
        (scan(a, b, h0) * torch.linspace(-1, 1, 5)).sum().backward()
        grads.append((a.grad, b.grad, h0.grad))
    for ours, loop in zip(*grads):
        torch.testing.assert_close(ours, loop, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("a_shape, b_shape, h0_shape, message", [
    ((2, 5, 3), (2, 5, 4), None, r"a \(2, 5, 3\) and b \(2, 5, 4\) must have one shape"),
    ((5,), (5,), None, "must have one shape"),
    ((2, 5, 3), (2, 5, 3), (2, 5, 3), r"h0 \(2, 5, 3\) must be a's shape without the time axis, \(2, 3\)"),
])
def test_bad_scan_shapes_are_refused_by_name(a_shape, b_shape, h0_shape, message):
    h0 = None if h0_shape is None else torch.zeros(h0_shape)
    for scan in (scan_sequential, scan_parallel):
        with pytest.raises(ValueError, match=message):
            scan(torch.zeros(a_shape), torch.zeros(b_shape), h0)
