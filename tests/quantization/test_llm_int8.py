"""LLM.int8(): exact routing of outlier columns, a hand-computed decomposition, and int8-level error."""

import pytest
import torch
import torch.nn.functional as F

from effref.quantization.driver import LayerInputs
from effref.quantization.llm_int8 import Int8Linear, llm_int8_layer, outlier_columns


def _layer(seed=0, rows=16, cols=32, stats=None):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(cols, rows)
    return linear, llm_int8_layer(linear, stats)


def _inputs(outlier_cols=(3, 17), n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    x = x.clamp(-5.9, 5.9)  # no accidental outliers
    for c in outlier_cols:
        x[c % n, c] = 8.0 + c  # one large value puts the whole column on the float path
    return x


def test_outlier_columns_are_exactly_those_reaching_the_threshold():
    x = _inputs((3, 17))
    assert outlier_columns(x).tolist() == [3, 17]
    x[0, 5] = -6.0  # |x| ≥ α counts, sign does not matter
    assert outlier_columns(x).tolist() == [3, 5, 17]
    assert outlier_columns(x, threshold=100.0).numel() == 0


def test_forward_equals_the_hand_computed_decomposition():
    linear, layer = _layer()
    x = _inputs((3, 17))
    w = linear.weight.detach().double()
    c_w = (w.abs().amax(1, keepdim=True) / 127).half().double()  # per-row absmax, stored in fp16
    w8 = torch.round(w / c_w)
    outliers, regular = [3, 17], [j for j in range(32) if j not in (3, 17)]
    xd = x.double()
    expected = xd[:, outliers] @ (w8[:, outliers] * c_w).T  # no calibration: dequantized int8 columns
    c_x = xd[:, regular].abs().amax(1, keepdim=True) / 127
    x8 = torch.round(xd[:, regular] / c_x)
    expected = expected + (x8 @ w8[:, regular].T) * c_x * c_w.T + linear.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_calibrated_outlier_columns_use_the_float16_weights():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16)
    with torch.no_grad():
        linear.weight[:, 3] *= 50  # a column whose int8 rounding would be coarse for the other columns
    stats = LayerInputs(abs_max=torch.cat([torch.ones(3), torch.tensor([9.0]), torch.ones(28)]))
    layer = llm_int8_layer(linear, stats)
    assert layer.outlier_cols.tolist() == [3] and layer.outlier_weight.dtype == torch.float16
    x = torch.zeros(4, 32)
    x[:, 3] = 10.0
    expected = x[:, 3:4] @ linear.weight[:, 3:4].half().float().T + linear.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_matches_the_dense_matmul_within_int8_error():
    linear, layer = _layer(seed=2, rows=64, cols=32)
    x = _inputs((3, 17), n=64)
    dense = F.linear(x, linear.weight, linear.bias)
    err = (layer(x) - dense).abs().max() / dense.abs().max()
    assert err < 0.02  # two 8-bit roundings per product: ~1/127 relative
    x_no_outliers = x.clamp(-5, 5)
    naive = torch.round(x_no_outliers / (x_no_outliers.abs().amax(1, keepdim=True) / 127))
    assert isinstance(layer, Int8Linear) and naive.abs().max() == 127
    assert layer(x.reshape(2, 32, 32)).shape == (2, 32, 64)


def test_bad_threshold_is_refused():
    with pytest.raises(ValueError, match="threshold=0 must be > 0"):
        llm_int8_layer(torch.nn.Linear(4, 4), None, threshold=0)
