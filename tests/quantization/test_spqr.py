"""SpQR: exact sparse outliers, 3-bit bilevel statistics, and a storage count done by hand."""

import pytest
import torch

from effref.quantization.driver import LayerInputs
from effref.quantization.linear import QuantLinear
from effref.quantization.spqr import SpQRConfig, spqr_layer, spqr_quantize


def _problem(seed=0, rows=32, cols=64, n=512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols**0.5)
    w = torch.randn(rows, cols, generator=g) * 0.02
    planted = torch.rand(rows, cols, generator=g) < 0.01
    w[planted] *= 25  # a few large weights, the kind SpQR keeps in fp16
    return w, x, x.T @ x / n, planted


def _linear(w):
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w.clone()
    return linear


def test_outliers_are_stored_exactly_and_planted_ones_are_found():
    w, _x, h, planted = _problem()
    out = spqr_quantize(w, h, SpQRConfig(outlier_threshold=8.0))
    layer = QuantLinear.from_linear(_linear(w), out["qtensor"], sparse_idx=out["sparse_idx"],
                                    sparse_val=out["sparse_val"])
    w_hat = layer.dequantize_weight()
    mask = out["outliers"]
    assert torch.equal(w_hat[mask], out["sparse_val"].float())  # the fp16 values, exactly, at those positions
    assert mask.sum() == out["sparse_idx"].numel()
    recall = (mask & planted).sum() / planted.sum()
    rate_elsewhere = (mask & ~planted).sum() / (~planted).sum()
    assert recall >= 0.6 and recall >= 20 * rate_elsewhere  # the planted large weights stand out


def test_more_outliers_less_error_and_statistics_are_three_bit():
    w, x, h, _ = _problem(seed=1)
    errors, counts = [], []
    for tau in (float("inf"), 16.0, 4.0):
        out = spqr_quantize(w, h, SpQRConfig(outlier_threshold=tau))
        layer = QuantLinear.from_linear(_linear(w), out["qtensor"], sparse_idx=out["sparse_idx"],
                                        sparse_val=out["sparse_val"])
        errors.append(((layer.dequantize_weight() - w) @ x.T).norm())
        counts.append(int(out["outliers"].sum()))
    assert counts[0] == 0 < counts[1] < counts[2]
    assert errors[0] > errors[1] > errors[2]
    q = out["qtensor"]
    for stat in (q.scale, q.zero):  # (G, R) codes in [0, 7], second-level fp16 per 16 rows
        assert stat.shape == (64 // 16, 32) and stat.codes.max() <= 7 and stat.codes.min() >= 0
        assert stat.scale.shape == (4, 2) and stat.scale.dtype == torch.float16


def test_storage_matches_a_hand_count():
    w, _x, h, _ = _problem(seed=2)
    layer = spqr_layer(_linear(w), LayerInputs(hessian=h), SpQRConfig(outlier_threshold=8.0))
    k = layer.sparse_idx.numel()
    codes = 32 * 64 * 3 // 8  # 3-bit weights
    stats = 2 * (4 * 32 * 3 // 8)  # 3-bit scales and zeros: G = 4 groups × R = 32 rows each
    second = 2 * 2 * (4 * 2 * 2)  # (scale, zero) × (s₂, z₂) × 4 groups · 2 row-groups · fp16
    sparse = k * (4 + 2)  # int32 index + fp16 value
    stored = sum(t.numel() * t.element_size() for t in layer.buffers())
    assert stored == codes + stats + second + sparse


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 9}, "bits=9 is not supported"),
    ({"group_size": 0}, "group_size=0 must be a positive integer"),
    ({"outlier_threshold": 0.0}, "outlier_threshold=0.0 must be > 0"),
])
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpQRConfig(**kwargs)


def test_missing_hessian_is_refused():
    with pytest.raises(ValueError, match="SpQR needs the Hessian"):
        spqr_layer(_linear(torch.randn(4, 16)), None)
