"""AWQ: the scaling is an identity before rounding; the search can only match or beat RTN, and does on salient inputs."""

import pytest
import torch
import torch.nn.functional as F

from effref.quantization import QuantConfig, quantize
from effref.quantization.awq import AWQConfig, awq_layer, awq_scales, awq_search, output_error
from effref.quantization.driver import LayerInputs


def _salient_problem(seed=0, rows=64, cols=256, n=2048):
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.ones(cols)
    magnitude[torch.randperm(cols, generator=g)[:8]] = 20.0  # a few salient input channels (AWQ's Fig. 2)
    x = torch.randn(n, cols, generator=g) * magnitude
    return torch.randn(rows, cols, generator=g) * 0.02, x


def _stats(x):
    return LayerInputs(n_tokens=len(x), samples=x, abs_mean=x.abs().mean(0))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.95])
def test_scaling_is_function_preserving_before_rounding(alpha):
    w, x = _salient_problem()
    s = awq_scales(x.abs().mean(0), alpha)  # (C,)
    torch.testing.assert_close(F.linear(x / s, w * s), F.linear(x, w), atol=1e-5, rtol=1e-5)
    assert torch.equal(s, s.half().float())  # the value the layer stores is the value used


def test_output_error_is_the_mean_squared_output_difference():
    w, x = _salient_problem()
    delta = torch.randn_like(w) * 1e-3
    expected = torch.trace(delta @ (x.T @ x / len(x)) @ delta.T)  # the same, through the Hessian
    torch.testing.assert_close(output_error(delta, x), expected, rtol=1e-4, atol=0)


def test_alpha_zero_is_rtn_and_the_search_never_loses_to_it():
    w, x = _salient_problem(seed=1)
    qcfg = QuantConfig(3, "group", 128)
    _s, _alpha, losses = awq_search(w, x.abs().mean(0), x, AWQConfig(qcfg))
    rtn = quantize(w, qcfg).dequantize()
    assert losses[0] == pytest.approx(float(output_error(rtn - w, x)), rel=1e-6)
    assert len(losses) == 20 and min(losses) <= losses[0]


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_beats_rtn_when_a_few_channels_are_salient(bits):
    w, x = _salient_problem(seed=bits)
    qcfg = QuantConfig(bits, "group", 128)
    layer = awq_layer(_linear(w), _stats(x), AWQConfig(qcfg))
    w_awq = layer.dequantize_weight()
    rtn = quantize(w, qcfg).dequantize()
    err = lambda w_hat: ((w - w_hat) @ x.T).norm()
    assert err(w_awq) < 0.85 * err(rtn)
    assert layer.meta["extra"]["alpha"] > 0 and layer.input_scale.dtype == torch.float16
    # the layer computes with Q(W·diag(s))·diag(s)⁻¹, exactly
    s = layer.input_scale.float()
    torch.testing.assert_close(w_awq, quantize(w * s, qcfg).dequantize() / s)


def _linear(w):
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w.clone()
    return linear


@pytest.mark.parametrize("call, error, message", [
    (lambda: AWQConfig(n_grid=0), ValueError, "n_grid=0 must be ≥ 1"),
    (lambda: AWQConfig(quant="w4"), TypeError, "quant must be a QuantConfig"),
    (lambda: awq_layer(_linear(torch.randn(4, 8)), None), ValueError, "AWQ needs the mean"),
    (lambda: awq_layer(_linear(torch.randn(4, 8)), LayerInputs(abs_mean=torch.ones(8))), ValueError, "AWQ needs"),
])
def test_bad_arguments_fail_with_clear_messages(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_scales_stay_inside_fp16_so_extreme_activations_keep_the_function():
    # mean |x| spanning 10 decades: s = s_x / sqrt(max · min) reached 1e5, stored as fp16 inf (Ŵ = NaN) before
    abs_mean = torch.logspace(-5, 5, 64)
    s = awq_scales(abs_mean, alpha=1.0)
    assert s.isfinite().all() and (s > 0).all()
    w = torch.randn(8, 64)
    torch.testing.assert_close((w * s) / s, w)
