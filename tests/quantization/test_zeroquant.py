"""ZeroQuant / W8A8: the simulated layer against the integer GEMM, per-token vs per-tensor, model level, save/load."""

import copy

import pytest
import torch
from torch import nn

from effref.kernels.w8a8 import quantize_rows_int8, w8a8_reference
from effref.models import load_model
from effref.models.llama import Llama
from effref.quantization import QuantConfig, fake_quantize, load_quantized, quantize, save_quantized
from effref.quantization.zeroquant import (
    WAQuantConfig,
    WAQuantLinear,
    quantize_activations,
    wa_quantize_linear,
    wa_quantize_model,
    zeroquant_model,
)


def _linear(in_f=96, out_f=40, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    lin.weight.data *= torch.linspace(0.2, 3.0, out_f)[:, None]  # rows of different ranges
    return lin


def test_per_channel_w8_per_token_a8_equals_the_integer_gemm():
    lin = _linear()
    lin.bias = None
    x = torch.randn(2, 7, 96) * torch.logspace(-1, 1, 7)[None, :, None]  # tokens of very different scale
    layer = wa_quantize_linear(lin, WAQuantConfig(w_granularity="channel", a_granularity="token"))
    qt = quantize(lin.weight, QuantConfig(bits=8, granularity="channel", symmetric=True))
    x_q, x_scale = quantize_rows_int8(x.reshape(14, 96))  # the kernel module's dynamic per-token quantizer
    expected = w8a8_reference(x_q, qt.codes.to(torch.int8), x_scale, qt.scale.float()[:, 0], torch.float32)
    torch.testing.assert_close(layer(x).reshape(14, 40), expected, atol=1e-5, rtol=1e-5)


def test_dynamic_activation_quantizer_matches_basics_row_by_row():
    x = torch.randn(3, 5, 32)
    per_token = quantize_activations(x, 8, "token")
    for row_in, row_out in zip(x.reshape(15, 32), per_token.reshape(15, 32)):
        cfg = QuantConfig(bits=8, granularity="tensor", symmetric=True, scale_dtype=torch.float32)
        torch.testing.assert_close(row_out, fake_quantize(row_in[None], cfg)[0])
    per_tensor = quantize_activations(x, 6, "tensor")
    cfg = QuantConfig(bits=6, granularity="tensor", symmetric=True, scale_dtype=torch.float32)
    assert torch.equal(per_tensor, fake_quantize(x.reshape(15, 32), cfg).reshape(3, 5, 32))  # one grid for all


def test_per_token_beats_per_tensor_when_tokens_differ_in_scale():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=gen)
    x[::8] *= 50  # a few loud tokens (e.g. the first token, delimiters) set the per-tensor scale
    quiet = torch.ones(64, dtype=torch.bool)
    quiet[::8] = False
    err_token = (quantize_activations(x, 8, "token") - x)[quiet].pow(2).mean()
    err_tensor = (quantize_activations(x, 8, "tensor") - x)[quiet].pow(2).mean()
    assert err_tensor > 100 * err_token


def test_group_weights_follow_basics_and_bias_is_kept():
    lin = _linear()
    layer = wa_quantize_linear(lin, WAQuantConfig(w_bits=4, group_size=32))
    expected_w = fake_quantize(lin.weight.detach(), QuantConfig(bits=4, group_size=32, symmetric=True))
    torch.testing.assert_close(layer.dequantize_weight(), expected_w.float())
    x = torch.randn(5, 96)
    expected = quantize_activations(x, 8, "token") @ expected_w.T + lin.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["hf", "effref"])
def test_model_level_swaps_block_linears_and_stays_close(impl):
    hf = load_model("tiny-llama").model
    model = hf if impl == "hf" else Llama.from_hf(hf)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))

    def logits(m):
        out = m(ids)
        return out.logits if hasattr(out, "logits") else out

    before = logits(model)
    zeroquant_model(model, progress=False)
    swapped = [n for n, m in model.named_modules() if isinstance(m, WAQuantLinear)]
    assert len(swapped) == 14 and not any("lm_head" in n for n in swapped)
    after = logits(model)
    rel = (after - before).norm() / before.norm()
    assert 0 < rel < 0.02  # W8A8 is close, and not a no-op


def test_save_and_load_round_trip_is_exact(tmp_path):
    model = Llama.from_hf(load_model("tiny-llama").model)
    skeleton = copy.deepcopy(model)
    wa_quantize_model(model, WAQuantConfig(w_bits=4, group_size=32, a_bits=6, a_granularity="tensor"),
                      progress=False)
    save_quantized(model, tmp_path / "m.safetensors")
    loaded = load_quantized(skeleton, tmp_path / "m.safetensors")
    layer = loaded.blocks[1].mlp.down
    assert isinstance(layer, WAQuantLinear) and layer.meta["extra"] == {"a_bits": 6, "a_granularity": "tensor"}
    ids = torch.randint(0, 256, (1, 16))
    assert torch.equal(loaded(ids), model(ids))


BAD = [
    (lambda: WAQuantConfig(a_bits=1), ValueError, r"a_bits=1 is not supported"),
    (lambda: WAQuantConfig(a_granularity="channel"), ValueError, r"a_granularity='channel' is not known"),
    (lambda: WAQuantConfig(w_bits=9), ValueError, r"bits=9 is not supported"),
    (lambda: WAQuantConfig(w_granularity="row"), ValueError, r"granularity='row' is not known"),
    (lambda: wa_quantize_linear(nn.Linear(100, 8), WAQuantConfig(group_size=64)), ValueError,
     r"group_size=64 does not divide in_features=100"),
    (lambda: wa_quantize_linear(nn.Conv1d(4, 4, 1), WAQuantConfig()), TypeError, r"linear must be an nn\.Linear"),
    (lambda: wa_quantize_linear(nn.Linear(64, 8), QuantConfig()), TypeError, r"cfg must be a WAQuantConfig"),
    (lambda: zeroquant_model(nn.Sequential(), WAQuantConfig(a_granularity="tensor")), ValueError,
     r"ZeroQuant quantizes activations per token"),
]


@pytest.mark.parametrize("make, error, message", BAD)
def test_bad_arguments_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        make()
