"""(IA)³ against Hugging Face peft on the same tiny LLaMA; merge/unmerge; save/load; bad inputs."""

import copy

import pytest
import torch
from torch import nn

from effref.eval import parameter_count
from effref.models import load_model
from effref.peft import load_trainable, trainable_state_dict
from effref.peft.core import merge_adapters, unmerge_adapters
from effref.peft.ia3 import IA3Config, IA3Linear, apply_ia3

peft = pytest.importorskip("peft")


def tiny():
    return load_model("tiny-llama", seed=0).model


def randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, IA3Linear):
                m.ia3_l.copy_(1 + 0.3 * torch.randn(m.ia3_l.shape, generator=g))


def ids():
    return torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))


def test_ia3_matches_peft_outputs_and_parameter_counts():
    base = tiny()
    ours = apply_ia3(copy.deepcopy(base), IA3Config())
    randomise(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"))
    copied = 0
    for name, module in theirs.named_modules():
        if isinstance(module, peft.tuners.ia3.IA3Layer):
            mine = ours.get_submodule(name.removeprefix("base_model.model."))
            with torch.no_grad():
                module.ia3_l["default"].copy_(mine.ia3_l.reshape(module.ia3_l["default"].shape))
            copied += 1
    assert copied == 6
    torch.testing.assert_close(ours(ids()).logits, theirs(ids()).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours(ids()).logits, base(ids()).logits, atol=1e-4)
    assert parameter_count(ours, trainable_only=True) == theirs.get_nb_trainable_parameters()[0]


def test_ia3_is_identity_at_init():
    base = tiny()
    torch.testing.assert_close(apply_ia3(copy.deepcopy(base), IA3Config())(ids()).logits, base(ids()).logits)


def test_ia3_merge_preserves_outputs_and_unmerge_is_exact_including_bias():
    layer = IA3Linear(nn.Linear(6, 4, bias=True), feedforward=False)
    ff = IA3Linear(nn.Linear(6, 4, bias=True), feedforward=True)
    x = torch.randn(3, 6)
    for m in (layer, ff):
        with torch.no_grad():
            m.ia3_l.uniform_(0.5, 1.5)
        w, b, out = m.base.weight.clone(), m.base.bias.clone(), m(x)
        m.merge()
        torch.testing.assert_close(m(x), out)
        m.unmerge()
        assert torch.equal(m.base.weight, w) and torch.equal(m.base.bias, b)
    model = apply_ia3(tiny(), IA3Config())
    randomise(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    out = model(ids()).logits
    merge_adapters(model, IA3Linear)
    torch.testing.assert_close(model(ids()).logits, out, rtol=1e-5, atol=1e-5)
    unmerge_adapters(model, IA3Linear)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_ia3_save_load_exact():
    src = apply_ia3(tiny(), IA3Config())
    randomise(src)
    dst = apply_ia3(tiny(), IA3Config())
    load_trainable(dst, trainable_state_dict(src))
    assert torch.equal(dst(ids()).logits, src(ids()).logits)


@pytest.mark.parametrize("kwargs, match", [
    ({"target_modules": ("nope",), "feedforward_modules": ()}, "match no linear layer"),
    ({"feedforward_modules": ("gate_proj",)}, "not in target_modules"),
])
def test_ia3_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        apply_ia3(tiny(), IA3Config(**kwargs))
