"""Outlier Suppression+: shift and scale are function-preserving, centre the channels, and cut W8A8 error."""

import copy

import pytest
import torch
from torch import nn

from effref.models import load_model
from effref.models.llama import Llama, RMSNorm
from effref.quantization import QuantConfig, fake_quantize
from effref.quantization.driver import LayerInputs
from effref.quantization.outlier_suppression import (
    NEEDS,
    OSPlusConfig,
    os_plus_factors,
    os_plus_model,
    os_plus_transform,
)
from effref.quantization.smoothquant import (
    SmoothGroup,
    apply_channel_transform,
    collect_group_stats,
    smoothing_groups,
)
from effref.quantization.zeroquant import (
    WAQuantConfig,
    WAQuantLinear,
    quantize_activations,
    wa_quantize_model,
)

IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
CFG = OSPlusConfig(n_grid=8, max_samples=128)


def outlier_model(impl: str) -> nn.Module:
    torch.manual_seed(0)
    hf = load_model("tiny-llama").model
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.input_layernorm.weight[[3, 17]] = torch.tensor([40.0, -25.0])
            layer.mlp.up_proj.weight[[7]] *= 20
    return hf if impl == "hf" else Llama.from_hf(hf)


def logits(model, ids=IDS):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("impl", ["hf", "effref"])
def test_shift_and_scale_are_function_preserving(impl):
    model = outlier_model(impl)
    before = logits(model)
    chosen = os_plus_transform(model, IDS, CFG, progress=False)
    assert sum(c["shift"] is not None for c in chosen.values()) == 2 * 3  # qkv, gate_up, o take shifts
    assert any((c["scale"] > 1).any() for c in chosen.values())
    torch.testing.assert_close(logits(model), before, atol=2e-5, rtol=1e-5)


def test_random_shift_through_grouped_query_attention_is_exact():
    # the v → o shift is exact because every query head's softmax weights sum to 1
    model = outlier_model("effref")
    before = logits(model)
    for group in smoothing_groups(model, ("o",)):
        C = group.linears()[0].in_features // group.kv_groups
        apply_channel_transform(group, 0.5 + torch.rand(C), 3 * torch.randn(C))
    torch.testing.assert_close(logits(model), before, atol=2e-5, rtol=1e-5)


def test_shift_centres_every_channel_on_the_calibration_data():
    model = outlier_model("effref")
    os_plus_transform(model, IDS, CFG, progress=False)
    groups = smoothing_groups(model, ("qkv", "gate_up"))
    stats = collect_group_stats(model, groups, IDS, ("min", "max"), progress=False)  # measured again
    for group in groups:
        centre = (stats[group.name].max + stats[group.name].min) / 2
        width = (stats[group.name].max - stats[group.name].min).max()
        assert centre.abs().max() < 1e-4 * width


def _single_linear_group(x: torch.Tensor, out_features: int = 32):
    """A norm → linear pair standing alone, with calibration statistics gathered from rows x."""
    block = nn.Module()
    block.norm = RMSNorm(x.shape[1], 1e-6)
    block.lin = nn.Linear(x.shape[1], out_features, bias=False)
    stats = LayerInputs()
    stats.update(x, NEEDS, keep=len(x), generator=torch.Generator().manual_seed(0))
    return SmoothGroup("g", "", block, "norm", ["lin"], "qkv"), stats


def test_search_helps_on_asymmetric_outlier_channels():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen)
    x[:, 5] = 30 + 10 * x[:, 5]  # lives in roughly [0, 60]
    x[:, 9] = -40 + 15 * x[:, 9]
    group, stats = _single_linear_group(x)
    quant = WAQuantConfig(w_granularity="channel", a_granularity="tensor")
    shift, scale, t = os_plus_factors(group, stats, OSPlusConfig(n_grid=20, quant=quant))
    w = group.linears()[0].weight.detach()
    target = x @ w.T

    def error(z, s):  # quantized output of the transformed layer, bias W z added back exactly
        xq = quantize_activations((x - z) / s, 8, "tensor")
        wq = fake_quantize(w * s, QuantConfig(bits=8, granularity="channel", symmetric=True))
        return (xq @ wq.T + z @ w.T - target).pow(2).sum()

    none = error(torch.zeros(64), torch.ones(64))
    shift_only = error(shift, torch.ones(64))
    both = error(shift, scale)
    assert torch.allclose(shift[[5, 9]], torch.stack([x[:, 5].max() + x[:, 5].min(), x[:, 9].max() + x[:, 9].min()])
                          / 2)
    assert both <= shift_only < none and both < 0.5 * none
    assert scale.min() == 1.0 and t <= (x - shift).abs().max()


def test_search_includes_no_scaling():
    group, stats = _single_linear_group(torch.randn(64, 32))  # no outliers: scaling cannot help much
    _, scale, _ = os_plus_factors(group, stats, OSPlusConfig(n_grid=1))
    assert torch.equal(scale, torch.ones(32))  # one candidate: t = the widest channel, s = 1


def test_os_plus_model_beats_naive_w8a8_on_outlier_activations():
    base = outlier_model("effref")
    reference = logits(base)
    quant = WAQuantConfig(w_granularity="channel", a_granularity="tensor")
    naive = wa_quantize_model(copy.deepcopy(base), quant, progress=False)
    os_plus = os_plus_model(copy.deepcopy(base), IDS, OSPlusConfig(n_grid=8, max_samples=128, quant=quant),
                            progress=False)
    assert sum(isinstance(m, WAQuantLinear) for m in os_plus.modules()) == 14
    assert (logits(os_plus) - reference).norm() < 0.5 * (logits(naive) - reference).norm()


BAD = [
    (lambda: OSPlusConfig(n_grid=0), ValueError, r"n_grid=0 must be a positive integer"),
    (lambda: os_plus_transform(outlier_model("effref"), cfg=CFG), ValueError, r"needs activation statistics"),
    (lambda: os_plus_factors(*_single_linear_group(torch.randn(8, 16))[:1], LayerInputs(), CFG), ValueError,
     r"lack 'min'"),
]


@pytest.mark.parametrize("make, error, message", BAD)
def test_bad_arguments_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("family", ["Gemma", "Gemma2", "OPT", "GPT2"])
def test_shift_and_scale_keep_the_function_of_other_families(family):
    # a shift folds into LayerNorm's own bias (OPT, GPT-2) or a bias added after Gemma's 1 + weight gain
    import transformers

    common = {"vocab_size": 256}
    configs = {"Gemma": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16),
               "OPT": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=64, max_position_embeddings=64),
               "GPT2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)}
    configs["Gemma2"] = configs["Gemma"]
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**common, **configs[family])
    model = getattr(transformers, "GPT2LMHeadModel" if family == "GPT2" else f"{family}ForCausalLM")(config).eval()
    if family == "GPT2":
        from effref.models.conv1d import linear_from_conv1d

        model = linear_from_conv1d(model)
    with torch.no_grad():
        before = logits(model)
        chosen = os_plus_transform(model, IDS, CFG, progress=False)
        assert any(c["shift"] is not None and c["shift"].abs().max() > 0 for c in chosen.values())
        torch.testing.assert_close(logits(model), before, atol=1e-4, rtol=1e-4)
