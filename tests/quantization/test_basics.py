"""Basics (survey Eq. 1) against brute force: nearest grid point, hand-computed scales, hand-packed bytes."""

import pytest
import torch

from effref.quantization import (
    GRANULARITIES,
    QuantConfig,
    QuantLinear,
    dequantize,
    fake_quantize,
    pack,
    quantize,
    unpack,
)
from effref.quantization.basics import code_range


def _groups(w, cfg):
    """The groups of w as a list of 1-D tensors, built with plain loops (independent of the reshapes)."""
    rows, cols = w.shape
    if cfg.granularity == "tensor":
        return [w.reshape(-1)]
    if cfg.granularity == "channel":
        return [w[r] for r in range(rows)]
    return [w[r, c:c + cfg.group_size] for r in range(rows) for c in range(0, cols, cfg.group_size)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_rounds_to_the_nearest_point_of_each_groups_grid(bits, granularity, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(6, 32) * torch.linspace(0.1, 3, 32)
    cfg = QuantConfig(bits, granularity, 8, symmetric, scale_dtype=torch.float32)
    w_hat = quantize(w, cfg).dequantize()
    lo, hi = code_range(bits, symmetric)
    for g, g_hat in zip(_groups(w, cfg), _groups(w_hat, cfg)):
        if symmetric:  # Eq. 1: s = absmax / (2^(b-1) - 1), grid s·{-(2^(b-1)-1) .. 2^(b-1)-1}
            scale, zero = g.abs().max() / hi, 0.0
        else:  # range [min(g, 0), max(g, 0)] onto {0 .. 2^b - 1} with an integer zero point
            scale = (g.max().clamp(min=0) - g.min().clamp(max=0)) / hi
            zero = torch.round(-g.min().clamp(max=0) / scale)
        grid = (torch.arange(lo, hi + 1, dtype=torch.float32) - zero) * scale  # every representable value
        nearest = grid[(g[:, None] - grid[None, :]).abs().argmin(1)]  # brute-force nearest grid point
        torch.testing.assert_close(g_hat, nearest, atol=1e-5, rtol=1e-5)


def test_scale_and_zero_shapes_per_granularity_and_zero_stays_exact():
    w = torch.randn(4, 12)
    w[:, 3] = 0.0
    shapes = {"tensor": (1, 1), "channel": (4, 1), "group": (4, 3)}
    for granularity, shape in shapes.items():
        q = quantize(w, QuantConfig(3, granularity, 4))
        assert tuple(q.scale.shape) == shape and tuple(q.zero.shape) == shape
        assert q.codes.shape == w.shape and q.scale.dtype == torch.float16
        assert torch.all(q.dequantize()[:, 3] == 0)
        assert torch.equal(dequantize(q), q.dequantize())


def test_fake_quantize_keeps_dtype_and_finer_granularity_is_more_accurate():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.rand(64, 1) * 3  # rows with very different ranges
    errors = [(fake_quantize(w, QuantConfig(4, g, 32)) - w).pow(2).mean() for g in GRANULARITIES]
    assert errors[0] > errors[1] > errors[2]
    assert fake_quantize(w.half(), QuantConfig(4)).dtype == torch.float16
    assert fake_quantize(w.to(torch.bfloat16), QuantConfig(4, "channel")).dtype == torch.bfloat16


def test_fit_group_size_picks_the_nearest_divisor():
    q = quantize(torch.randn(3, 576), QuantConfig(4, group_size=128, fit_group_size=True))
    assert q.group_size == 144 and q.scale.shape == (3, 4)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip_is_exact(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (1, 7, 8, 1001):
        codes = torch.randint(0, 2**bits, (n,), generator=g)
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
        assert torch.equal(unpack(packed, bits, n).long(), codes)


def test_pack_matches_hand_packed_bytes():
    assert pack(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]  # code i in bits 2i..2i+1
    assert pack(torch.tensor([0xA, 0x5]), 4).tolist() == [0x5A]
    # 3 bits, 8 codes -> 3 bytes: codes 1..7,0 give the 24-bit word Σ c_i·8^i = 0o07654321
    word = sum(c << (3 * i) for i, c in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    assert pack(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]), 3).tolist() == [word & 255, (word >> 8) & 255, word >> 16]


def test_nbytes_matches_a_hand_count():
    q = quantize(torch.randn(64, 256), QuantConfig(4, "group", 128))  # 64·256 codes, 64·2 groups
    assert q.nbytes == 64 * 256 // 2 + 64 * 2 * 2 + 64 * 2 // 2  # 4-bit codes + fp16 scales + 4-bit zeros
    q = quantize(torch.randn(64, 256), QuantConfig(3, "channel", symmetric=True))
    assert q.nbytes == 64 * 256 * 3 // 8 + 64 * 2 and q.zero is None
    assert q.bits_per_value == pytest.approx(3 + 16 / 256)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_quant_linear_uses_exactly_the_dequantized_weight(granularity, symmetric):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 16)
    q = quantize(linear.weight, QuantConfig(3, granularity, 16, symmetric))
    layer = QuantLinear.from_linear(linear, q)
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, q.dequantize(), linear.bias))
    assert torch.equal(layer.qtensor().codes, q.codes)
    assert [p for p in layer.parameters()] == []  # everything is a buffer


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 1}, "bits=1 is not supported; use an integer from 2 to 8"),
    ({"bits": 9}, "bits=9 is not supported"),
    ({"bits": 4.0}, "bits=4.0 is not supported"),
    ({"granularity": "row"}, "granularity='row' is not known"),
    ({"group_size": 0}, "group_size=0 must be a positive integer"),
    ({"scale_dtype": torch.int8}, "must be a floating dtype"),
])
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        QuantConfig(**kwargs)


@pytest.mark.parametrize("call, error, message", [
    (lambda: quantize(torch.randn(4, 576), QuantConfig(4, group_size=100)), ValueError,
     "group_size=100 does not divide in_features=576; use a divisor such as 96"),
    (lambda: quantize(torch.ones(4, 8, dtype=torch.long), QuantConfig(4, "channel")), TypeError,
     "must be a floating-point tensor"),
    (lambda: quantize(torch.tensor([[1.0, float("nan")]]), QuantConfig(4, "channel")), ValueError, "inf or NaN"),
    (lambda: quantize(torch.randn(4, 8), "4bit"), TypeError, "cfg must be a QuantConfig"),
    (lambda: pack(torch.tensor([0, 4]), 2), ValueError, r"codes must lie in \[0, 3\] for bits=2"),
    (lambda: pack(torch.tensor([0.5]), 2), TypeError, "codes must be an integer tensor"),
    (lambda: unpack(pack(torch.tensor([1, 2, 3]), 2), 2, 9), ValueError, "pass the numel used when packing"),
    (lambda: dequantize(torch.randn(3)), TypeError, "q must be a QTensor"),
])
def test_bad_arguments_fail_with_clear_messages(call, error, message):
    with pytest.raises(error, match=message):
        call()
