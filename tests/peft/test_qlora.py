"""QLoRA: NF4 levels vs the paper's table, nearest-level rounding vs brute force, double-quant byte counting,
the 4-bit base under LoRA vs a float base holding the same dequantized weight, and bad inputs."""

import copy

import pytest
import torch

from effref.eval import bits_per_parameter, model_size_bytes, parameter_count
from effref.models import load_model
from effref.peft.core import load_trainable, trainable_state_dict
from effref.peft.lora import LoraConfig, LoraLinear
from effref.peft.qlora import (
    LLAMA_LINEARS,
    NF4Config,
    NF4Linear,
    apply_qlora,
    double_dequantize,
    double_quantize,
    nf4_levels,
    quantize_model_nf4,
    quantize_nf4,
)

# QLoRA paper (arXiv:2305.14314), Appendix E, "NF4 data type": the 16 values as printed there.
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def test_nf4_levels_from_normal_quantiles_equal_the_published_table():
    torch.testing.assert_close(nf4_levels(), torch.tensor(PAPER_NF4), rtol=0, atol=1e-6)


def test_nf4_levels_are_asymmetric_with_an_exact_zero():
    levels = nf4_levels()
    assert (levels > 0).sum() == 8 and (levels < 0).sum() == 7 and (levels == 0).sum() == 1
    assert levels.min() == -1 and levels.max() == 1 and bool((levels.diff() > 0).all())


def test_quantize_nf4_picks_the_nearest_level_like_brute_force():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    indices, absmax = quantize_nf4(w, block_size=64)
    blocks = w.reshape(-1, 64)
    torch.testing.assert_close(absmax, blocks.abs().amax(1))
    brute = ((blocks / absmax[:, None])[..., None] - nf4_levels()).abs().argmin(-1)  # (n_blocks, 64)
    assert torch.equal(indices.long(), brute.reshape(-1))


def _bytes_formula(numel, double_quant, block=64, dq_block=256):
    n_blocks = numel // block
    if not double_quant:
        return numel // 2 + 4 * n_blocks  # 4-bit codes + one fp32 absmax per block
    return numel // 2 + n_blocks + 4 * -(-n_blocks // dq_block) + 4  # + fp8 scales, fp32 per 256, fp32 mean


@pytest.mark.parametrize("double_quant, overhead", [(False, 0.5), (True, 8 / 64 + 32 / (64 * 256))])
def test_bits_per_parameter_accounting_by_counting_bytes(double_quant, overhead):
    """0.5 bits of scale overhead per parameter without DQ, 8/64 + 32/(64·256) ≈ 0.127 with it (paper §3)."""
    linear = torch.nn.Linear(4096, 256, bias=False)  # 1,048,576 weights = 16,384 blocks = 64 DQ blocks
    layer = NF4Linear(linear, NF4Config(double_quant=double_quant))
    numel = linear.weight.numel()
    assert model_size_bytes(layer) == _bytes_formula(numel, double_quant)
    bits = bits_per_parameter(layer, n_params=numel)
    per_tensor_mean = 32 / numel if double_quant else 0.0  # DQ's one fp32 mean for the whole tensor
    assert bits - 4 == pytest.approx(overhead + per_tensor_mean, rel=1e-12)
    assert round(bits - 4, 3) == (0.127 if double_quant else 0.5)


def test_double_quantization_recovers_block_scales_to_fp8_precision():
    absmax = torch.rand(1000, generator=torch.Generator().manual_seed(1)) + 0.5  # 1000: not a multiple of 256
    codes, scale, mean = double_quantize(absmax, 256)
    assert codes.dtype == torch.uint8 and codes.shape == (1000,) and scale.shape == (4,)
    back = double_dequantize(codes, scale, mean, 256)
    centred = (absmax - mean).abs()
    # float8 e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4, plus the subnormal floor 2^-10·scale
    bound = centred * 2**-4 + scale.repeat_interleave(256)[:1000] * 2**-9
    assert bool(((back - absmax).abs() <= bound + 1e-7).all())
    assert (back - absmax).abs().max() > 0  # it really is lossy


def test_nf4_linear_forward_and_input_gradient_match_float_linear_with_the_same_weight():
    linear = torch.nn.Linear(128, 64)
    layer = NF4Linear(linear)
    reference = torch.nn.Linear(128, 64)
    with torch.no_grad():
        reference.weight.copy_(layer.dequantized_weight())
        reference.bias.copy_(linear.bias)
    x = torch.randn(2, 3, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    layer(x).pow(2).sum().backward()
    reference(x_ref).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert len(list(layer.parameters())) == 0  # codes and scales are buffers: nothing to train


def test_qlora_layer_trains_like_lora_on_the_dequantized_float_base():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    q = LoraLinear(NF4Linear(linear), r=4, alpha=8)
    f = LoraLinear(torch.nn.Linear(64, 32, bias=False), r=4, alpha=8)
    with torch.no_grad():
        f.base.weight.copy_(q.base.dequantized_weight())
        f.lora_A.weight.copy_(q.lora_A.weight)
        f.lora_B.weight.normal_()
        q.lora_B.weight.copy_(f.lora_B.weight)
    f.base.weight.requires_grad_(False)
    x = torch.randn(5, 64)
    torch.testing.assert_close(q(x), f(x))
    q(x).square().mean().backward()
    f(x).square().mean().backward()
    torch.testing.assert_close(q.lora_A.weight.grad, f.lora_A.weight.grad)
    torch.testing.assert_close(q.lora_B.weight.grad, f.lora_B.weight.grad)


def test_apply_qlora_on_tiny_llama_trains_only_adapters_and_saves_them_exactly():
    base = load_model("tiny-llama", seed=0).model
    model = apply_qlora(copy.deepcopy(base), LoraConfig(r=4, alpha=8, target_modules=LLAMA_LINEARS))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    nf4_only = quantize_model_nf4(copy.deepcopy(base))
    torch.testing.assert_close(model(ids).logits, nf4_only(ids).logits)  # B = 0: the adapter starts silent
    trainable = trainable_state_dict(model)
    assert trainable and all("lora_" in name for name in trainable)
    layers = 2 * len(LLAMA_LINEARS)
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == layers
    assert model_size_bytes(model) < 0.7 * model_size_bytes(base)  # the embedding (16k params) stays fp32
    assert parameter_count(model, trainable_only=True) == sum(v.numel() for v in trainable.values())
    model(ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    other = apply_qlora(copy.deepcopy(base), LoraConfig(r=4, alpha=8, target_modules=LLAMA_LINEARS))
    load_trainable(other, trainable_state_dict(model))
    torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("make, error, message", [
    (lambda: quantize_nf4(torch.randn(10, 10)), ValueError, "block_size=64 does not divide w.numel"),
    (lambda: quantize_nf4(torch.full((64,), float("nan"))), ValueError, "inf or NaN"),
    (lambda: quantize_nf4(torch.ones(64, dtype=torch.int32)), TypeError, "floating-point tensor"),
    (lambda: NF4Linear(torch.nn.Conv1d(4, 4, 1)), TypeError, "quantizes an nn.Linear, got Conv1d"),
    (lambda: NF4Config(block_size=0), ValueError, "block_size=0 must be a positive integer"),
    (lambda: NF4Config(dq_block_size=2.5), ValueError, "dq_block_size=2.5 must be a positive integer"),
])
def test_bad_inputs_raise_clear_errors(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_quantize_model_checks_every_layer_before_changing_any():
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(64, 64))
    model.add_module("v_proj", torch.nn.Linear(10, 10))  # 100 weights: no whole 64-blocks
    with pytest.raises(ValueError, match=r"does not divide the \(10, 10\) weight of v_proj"):
        quantize_model_nf4(model, target_modules=("q_proj", "v_proj"))
    assert isinstance(model.q_proj, torch.nn.Linear)
    with pytest.raises(ValueError, match="match no linear layer"):
        quantize_model_nf4(model, target_modules=("nope",))
