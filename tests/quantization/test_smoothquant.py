"""SmoothQuant: smoothing is function-preserving, equalises activation and weight maxima, and helps W8A8."""

import copy

import pytest
import torch
from torch import nn

from effref.models import load_model
from effref.models.llama import Llama
from effref.models.conv1d import linear_from_conv1d
from effref.quantization.smoothquant import (
    KINDS,
    SmoothQuantConfig,
    apply_channel_transform,
    collect_group_stats,
    group_weight_abs_max,
    smooth_model,
    smoothing_factors,
    smoothing_groups,
    smoothquant_model,
)
from effref.quantization.zeroquant import WAQuantConfig, wa_quantize_model

IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def outlier_model(impl: str) -> nn.Module:
    """tiny-llama with a few loud input channels, as LLMs have: norm gains ×40 and some up rows ×20."""
    torch.manual_seed(0)
    hf = load_model("tiny-llama").model
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.input_layernorm.weight[[3, 17, 40]] = torch.tensor([40.0, -25.0, 30.0])
            layer.post_attention_layernorm.weight[[5, 50]] = torch.tensor([35.0, 20.0])
            layer.mlp.up_proj.weight[[7, 90]] *= 20
    return hf if impl == "hf" else Llama.from_hf(hf)


def logits(model, ids=IDS):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("impl", ["hf", "effref"])
@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_smoothing_is_function_preserving(impl, alpha):
    model = outlier_model(impl)
    before = logits(model)
    factors = smooth_model(model, IDS, alpha=alpha, progress=False)
    assert len(factors) == 2 * 4
    assert max(f.max() / f.min() for f in factors.values()) > 10  # the factors really differ across channels
    torch.testing.assert_close(logits(model), before, atol=2e-5, rtol=1e-5)


def test_factors_follow_equation_4():
    act = torch.tensor([1.0, 100.0, 0.0, 4.0])
    w = torch.tensor([0.5, 0.5, 2.0, 0.0])
    s = smoothing_factors(act, w, alpha=0.75)
    expected = torch.tensor([1.0 ** 0.75 / 0.5 ** 0.25, 100 ** 0.75 / 0.5 ** 0.25, 1e-5 ** 0.75 / 2 ** 0.25,
                             4 ** 0.75 / 1e-5 ** 0.25])
    torch.testing.assert_close(s, expected)


def test_alpha_half_equalises_activation_and_weight_maxima():
    # after smoothing with α = 0.5: max|X_j / s_j| = sqrt(max|X_j| max|W_j|) = max|s_j W_j|, channel by channel.
    # (Only the paper's two groups: smoothing "o" / "down" later rescales v's / up's rows, hence their columns.)
    model = outlier_model("effref")
    smooth_model(model, IDS, alpha=0.5, kinds=("qkv", "gate_up"), progress=False)
    groups = smoothing_groups(model, ("qkv", "gate_up"))
    stats = collect_group_stats(model, groups, IDS, progress=False)  # measured again, on the smoothed model
    for group in groups:
        torch.testing.assert_close(stats[group.name].abs_max, group_weight_abs_max(group), rtol=1e-4, atol=1e-6)


def test_gqa_output_group_maps_query_heads_to_their_kv_head():
    model = outlier_model("effref")  # 4 query heads, 2 key/value heads, d_head 16
    group = next(g for g in smoothing_groups(model, ("o",)))
    assert group.kv_groups == 2 and group.d_head == 16
    stat = torch.arange(64.0)  # o's input channel c = h·16 + d
    reduced = group.reduce(stat)  # kv head 0 serves query heads 0, 1; kv head 1 serves 2, 3
    assert torch.equal(reduced, torch.cat([torch.arange(16.0, 32.0), torch.arange(48.0, 64.0)]))
    assert torch.equal(group.expand(torch.arange(32.0)), torch.cat([torch.arange(16.0)] * 2 +
                                                                  [torch.arange(16.0, 32.0)] * 2))


def test_smoothquant_beats_naive_w8a8_on_outlier_activations():
    base = outlier_model("effref")
    reference = logits(base)
    quant = WAQuantConfig(w_granularity="channel", a_granularity="tensor")
    naive = wa_quantize_model(copy.deepcopy(base), quant, progress=False)
    smoothed = smoothquant_model(copy.deepcopy(base), IDS, SmoothQuantConfig(alpha=0.5, quant=quant), progress=False)
    err_naive = (logits(naive) - reference).norm()
    err_smooth = (logits(smoothed) - reference).norm()
    assert err_smooth < 0.5 * err_naive


BAD = [
    (lambda: smoothing_factors(torch.ones(3), torch.ones(3), alpha=1.5), ValueError, r"alpha=1\.5 must lie in \[0, 1\]"),
    (lambda: smoothing_groups(outlier_model("effref"), ("qkv", "attn")), ValueError, r"kinds=\['attn'\] are not known"),
    (lambda: smooth_model(outlier_model("effref")), ValueError, r"needs activation statistics: pass calib_batches"),
    (lambda: smooth_model(outlier_model("effref"), IDS.float()), ValueError, r"calib_batches must be a \(n, T\)"),
    (lambda: smoothing_groups(nn.Sequential(nn.ModuleList([nn.Sequential(nn.Linear(2, 2))]))), ValueError,
     r"has no config with a vocab_size; pass probe="),
    (lambda: smoothing_groups(_family("OPT"), ("qkv", "o")), ValueError,
     r"OPTForCausalLM has no \['o'\] groups .* o / down follow LLaMA-shaped"),
    (lambda: apply_channel_transform(smoothing_groups(outlier_model("hf"), ("down",))[0], torch.ones(128),
                                     torch.zeros(128)), ValueError, r"cannot take a shift"),
]


@pytest.mark.parametrize("make, error, message", BAD)
def test_bad_arguments_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        make()


def _family(name: str) -> nn.Module:
    import transformers

    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    extra = {"OPT": dict(ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64, enable_bias=True),
             "GPT2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)}
    torch.manual_seed(0)
    kwargs = extra.get(name, dict(intermediate_size=128, num_key_value_heads=2, head_dim=16))
    config = getattr(transformers, f"{name}Config")(**(common if name != "GPT2" else {"vocab_size": 256}), **kwargs)
    model = getattr(transformers, f"{name}ForCausalLM" if name != "GPT2" else "GPT2LMHeadModel")(config).eval()
    with torch.no_grad():  # norms away from their init, so that a wrong norm form shows
        for pname, p in model.named_parameters():
            if "norm" in pname or ".ln_" in pname or "layer_norm" in pname:
                p.uniform_(0.5, 1.5)
    return linear_from_conv1d(model) if name == "GPT2" else model


FAMILY_GROUPS = {  # family: (norm feeding the MLP, Gemma-style gain offset, kinds found)
    "Mistral": ("post_attention_layernorm", 0.0, KINDS),
    "Qwen2": ("post_attention_layernorm", 0.0, KINDS),
    "Gemma": ("post_attention_layernorm", 1.0, KINDS),
    "Gemma2": ("pre_feedforward_layernorm", 1.0, KINDS),
    "OPT": ("final_layer_norm", 0.0, ("qkv", "gate_up")),
    "GPT2": ("ln_2", 0.0, ("qkv", "gate_up")),
}


@pytest.mark.parametrize("family", FAMILY_GROUPS)
def test_groups_come_from_the_computation_and_smoothing_keeps_each_familys_function(family):
    # Gemma's norms scale by 1 + weight, Gemma 2's MLP reads pre_feedforward_layernorm (post_attention_layernorm
    # feeds the residual), OPT and GPT-2 have LayerNorm with a bias: name tables got these wrong before
    model = _family(family)
    mlp_norm, offset, kinds = FAMILY_GROUPS[family]
    groups = smoothing_groups(model)
    assert tuple(dict.fromkeys(g.kind for g in groups)) == kinds
    gate_up = next(g for g in groups if g.kind == "gate_up")
    assert gate_up.producer == mlp_norm and gate_up.gain_offset == offset
    with torch.no_grad():
        before = model(IDS[:1]).logits
        factors = smooth_model(model, IDS, alpha=0.5, progress=False)
        assert max(f.max() / f.min() for f in factors.values()) > 2  # the scales really differ across channels
        torch.testing.assert_close(model(IDS[:1]).logits, before, rtol=1e-4, atol=1e-4)


def test_a_norm_of_another_form_is_refused_and_nothing_changes():
    model = _family("Qwen2")
    norm = model.model.layers[1].post_attention_layernorm
    norm.forward = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight ** 2
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"post_attention_layernorm \(Qwen2RMSNorm\) does not compute"):
        smooth_model(model, IDS, progress=False)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_block_that_breaks_the_folding_is_found_on_the_probe_and_rolled_back():
    # up_proj's output goes through tanh before the product: scaling up's rows no longer passes to down exactly
    model = _family("Mistral")
    mlp = model.model.layers[1].mlp
    mlp.forward = lambda x: mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * torch.tanh(mlp.up_proj(x)))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"smoothing changed MistralForCausalLM's logits by .* left unchanged"):
        smooth_model(model, IDS, progress=False)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(type(m) is nn.Linear for m in mlp.children() if m is not mlp.act_fn)
