"""Save/load with safetensors: exact round trip for every kind of QuantLinear, and sizes counted by hand."""

import json

import pytest
import torch
from safetensors import safe_open

from effref.eval import bits_per_parameter, model_size_bytes, parameter_count
from effref.models import load_model
from effref.quantization import (
    QuantConfig,
    load_quantized,
    quantize,
    quantize_model,
    quantized_linear_bits,
    save_quantized,
)
from effref.quantization.awq import AWQConfig, awq_layer
from effref.quantization.gptq import GPTQConfig, gptq_layer
from effref.quantization.llm_int8 import llm_int8_layer
from effref.quantization.quip import QuIPConfig, quip_layer
from effref.quantization.spqr import SpQRConfig, spqr_layer


def _mixed(name, linear, stats):
    """A different method for each kind of linear, so one file holds every layout."""
    kind = name.split(".")[-1]
    if kind == "q_proj":
        return quantize(linear.weight, QuantConfig(3, "group", 16))
    if kind == "k_proj":
        stats.abs_max = stats.abs_max.clone()
        stats.abs_max[[2, 9]] = 10.0  # force two float16 outlier columns
        return llm_int8_layer(linear, stats)
    if kind == "v_proj":
        return awq_layer(linear, stats, AWQConfig(QuantConfig(4, "group", 32)))
    if kind == "o_proj":
        return spqr_layer(linear, stats, SpQRConfig(outlier_threshold=4.0))
    if kind == "gate_proj":
        return quip_layer(linear, stats, QuIPConfig(GPTQConfig(QuantConfig(2, "channel"))))
    if kind == "up_proj":
        return quip_layer(linear, stats, QuIPConfig(GPTQConfig(QuantConfig(3, "channel")), rotation="hadamard"))
    return gptq_layer(linear, stats, GPTQConfig(QuantConfig(4, "channel", symmetric=True), act_order=True))


def test_every_layout_survives_a_save_load_round_trip_exactly(tmp_path):
    model = load_model("tiny-llama", seed=0).model
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_model(model, _mixed, calib, needs=("hessian", "abs_max", "abs_mean", "samples"), progress=False)
    path = tmp_path / "tiny.safetensors"
    size = save_quantized(model, path)
    skeleton = load_model("tiny-llama", seed=1).model  # different random weights everywhere
    load_quantized(skeleton, path)
    ids = torch.randint(0, 256, (2, 16))
    assert torch.equal(skeleton(ids).logits, model(ids).logits)
    ours, theirs = model.state_dict(), skeleton.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with safe_open(str(path), framework="pt") as f:
        header_bytes = len(json.dumps(f.metadata())) + 200 * len(list(f.keys()))
    assert model_size_bytes(model) <= size <= model_size_bytes(model) + header_bytes  # tied embedding stored once


def test_bits_per_parameter_matches_a_hand_count():
    model = load_model("tiny-llama").model
    n_params = parameter_count(model)
    quantize_model(model, lambda n, lin, s: quantize(lin.weight, QuantConfig(4, "group", 32)), progress=False)
    # per block: q,o (64×64), k,v (32×64), gate,up (128×64), down (64×128): 4-bit codes, fp16 scale + 4-bit zero
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * 2
    linear_bytes = sum(r * c // 2 + r * (c // 32) * 2 + r * (c // 32) // 2 for r, c in shapes)
    weights = sum(r * c for r, c in shapes)
    assert quantized_linear_bits(model) == pytest.approx(8 * linear_bytes / weights)
    assert quantized_linear_bits(model) == pytest.approx(4 + 16 / 32 + 4 / 32)
    rest = 256 * 64 * 4 + 64 * 4 * (2 * 2 + 1) + 2 * 8 * 4  # tied fp32 embedding, 5 RMSNorms, RoPE inv_freq ×2
    assert model_size_bytes(model) == linear_bytes + rest
    assert bits_per_parameter(model, n_params) == pytest.approx(8 * (linear_bytes + rest) / n_params)


@pytest.mark.parametrize("case, error, message", [
    ("no_quant", ValueError, "model has no QuantLinear modules"),
    ("missing_file", FileNotFoundError, "no file at"),
    ("plain_file", ValueError, r"was not written by save_compressed \(or save_quantized\)"),
    ("wrong_skeleton", ValueError, "that the skeleton cannot hold"),
])
def test_bad_arguments_fail_with_clear_messages(tmp_path, case, error, message):
    from safetensors.torch import save_model

    model = load_model("tiny-llama").model
    path = tmp_path / "m.safetensors"
    with pytest.raises(error, match=message):
        if case == "no_quant":
            save_quantized(model, path)
        elif case == "missing_file":
            load_quantized(model, tmp_path / "absent.safetensors")
        elif case == "plain_file":
            save_model(model, str(path))
            load_quantized(model, path)
        else:
            quantize_model(model, lambda n, lin, s: quantize(lin.weight, QuantConfig(4, "channel")), progress=False)
            save_quantized(model, path)
            load_quantized(torch.nn.Sequential(torch.nn.Linear(2, 2)), path)
