"""Hyena: the FFT convolution against direct convolutions (ours and torch's conv1d), and the operator's promises:
causal, the same through either convolution, filters that decay."""

import pytest
import torch
import torch.nn.functional as F

from effref.alternatives.hyena import HyenaOperator
from effref.alternatives.recurrent import causal_conv_direct, causal_conv_fft

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("L", [1, 2, 7, 64, 300])
def test_fft_convolution_equals_direct_convolution(L):
    g = torch.Generator().manual_seed(L)
    u, k = torch.randn(2, 5, L, generator=g, dtype=torch.float64), torch.randn(5, L, generator=g, dtype=torch.float64)
    # torch's conv1d is a cross-correlation: flip the kernel; left padding makes it causal
    reference = F.conv1d(F.pad(u, (L - 1, 0)), k.flip(-1)[:, None], groups=5)
    torch.testing.assert_close(causal_conv_direct(u, k), reference)
    torch.testing.assert_close(causal_conv_fft(u, k), reference)


def test_operator_is_the_same_through_either_convolution_and_trains():
    torch.manual_seed(0)
    op = HyenaOperator(d_model=16, max_len=128)
    u = torch.randn(2, 100, 16)
    y_fft = op(u)
    op.conv = "direct"
    torch.testing.assert_close(op(u), y_fft, rtol=1e-4, atol=1e-5)
    y_fft.square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in op.parameters())


def test_operator_is_causal():
    torch.manual_seed(1)
    op = HyenaOperator(d_model=8, max_len=64, order=3)
    u = torch.randn(1, 50, 8)
    changed = u.clone()
    changed[:, 30:] = torch.randn(1, 20, 8)
    y, y_changed = op(u), op(changed)
    torch.testing.assert_close(y_changed[:, :30], y[:, :30], rtol=0, atol=1e-6)
    assert (y_changed[:, 30:] - y[:, 30:]).abs().max() > 1e-3


def test_filters_are_implicit_and_decay():
    op = HyenaOperator(d_model=8, max_len=512)
    n_params = sum(p.numel() for p in op.filter.parameters())
    h = op.filter(512)  # (N, d, L)
    assert h.shape == (2, 8, 512) and n_params < h.numel()  # longer filters than parameters
    window = op.filter.window  # (L, d)
    assert (window[-1] < 0.05).all() and (window[1:] <= window[:-1]).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(order=0), r"order=0 must be a positive integer"),
    (dict(max_len=0), r"max_len=0 must be a positive integer"),
    (dict(conv="slow"), r"conv='slow' is not known; use one of \('fft', 'direct'\)"),
])
def test_bad_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HyenaOperator(**{"d_model": 8, "max_len": 32, **kwargs})


def test_inputs_longer_than_max_len_are_refused():
    op = HyenaOperator(d_model=8, max_len=32)
    with pytest.raises(ValueError, match=r"L=40 must be in \[1, max_len=32\]; build the operator with a larger"):
        op(torch.randn(1, 40, 8))
    with pytest.raises(ValueError, match=r"u must have shape \(B, L, d_model=8\)"):
        op(torch.randn(40, 8))
