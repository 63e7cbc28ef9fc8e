"""Series and parallel bottleneck adapters: identity at init, brute-force formula, counts, bad inputs."""

import copy

import pytest
import torch
import torch.nn.functional as F

from effref.eval import parameter_count
from effref.models import load_model
from effref.peft import load_trainable, trainable_state_dict
from effref.peft.adapters import AdapterConfig, BottleneckAdapter, apply_adapters
from effref.peft.core import merge_adapters


def tiny(impl="hf"):
    return load_model("tiny-llama", seed=0, impl=impl).model


def ids():
    return torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))


def perturb(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BottleneckAdapter):
                m.adapter_up.weight.copy_(torch.randn(m.adapter_up.weight.shape, generator=g) * 0.1)


@pytest.mark.parametrize("placement", ["series", "parallel"])
@pytest.mark.parametrize("impl", ["hf", "effref"])
def test_adapters_are_identity_at_init_and_train_only_themselves(placement, impl):
    base = tiny(impl)
    targets = ("self_attn", "mlp") if impl == "hf" else ("attn", "mlp")
    model = apply_adapters(copy.deepcopy(base), AdapterConfig(bottleneck=8, placement=placement,
                                                              target_modules=targets))
    out, ref = model(ids()), base(ids())
    torch.testing.assert_close(getattr(out, "logits", out), getattr(ref, "logits", ref))
    # two layers × two blocks × (down: 64·8 + 8, up: 8·64 + 64)
    assert parameter_count(model, trainable_only=True) == 4 * (64 * 8 + 8 + 8 * 64 + 64)
    perturb(model)
    out = model(ids())
    assert not torch.allclose(getattr(out, "logits", out), getattr(ref, "logits", ref), atol=1e-4)
    assert all("adapter_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_series_and_parallel_match_their_formulas_on_one_mlp():
    mlp = tiny().model.layers[0].mlp
    x = torch.randn(3, 5, 64)
    for placement, scaling in (("series", 1.0), ("parallel", 0.5)):
        a = BottleneckAdapter(copy.deepcopy(mlp), 8, placement, scaling)
        with torch.no_grad():
            a.adapter_up.weight.normal_()
        y = mlp(x)
        src = y if placement == "series" else x
        h = F.relu(src @ a.adapter_down.weight.T + a.adapter_down.bias)
        expected = y + scaling * (h @ a.adapter_up.weight.T + a.adapter_up.bias)
        torch.testing.assert_close(a(x), expected)


def test_adapters_save_load_exact():
    cfg = AdapterConfig(bottleneck=4, placement="parallel")
    src = apply_adapters(tiny(), cfg)
    perturb(src)
    dst = apply_adapters(tiny(), cfg)
    load_trainable(dst, trainable_state_dict(src))
    assert torch.equal(dst(ids()).logits, src(ids()).logits)


@pytest.mark.parametrize("kwargs, match", [
    ({"bottleneck": 0}, "bottleneck=0 must be a positive"),
    ({"bottleneck": 65}, "bottleneck=65 is wider"),
    ({"placement": "diagonal"}, "placement='diagonal'"),
    ({"target_modules": ("ffn",)}, "match no module"),
])
def test_adapters_reject_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        apply_adapters(tiny(), AdapterConfig(**kwargs))


def test_merging_bottleneck_adapters_is_refused():
    model = apply_adapters(tiny(), AdapterConfig())
    with pytest.raises(ValueError, match=r"has \w*Adapter\w* layers but no MergeableAdapter layers; only adapters "
                                         r"that fold into a weight .* can be merged"):
        merge_adapters(model)
