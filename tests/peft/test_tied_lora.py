"""Tied-LoRA: shared storage, formula, parameter counts, identity at init, merge, save/load, bad inputs."""

import copy

import pytest
import torch
from torch import nn

from effref.eval import parameter_count
from effref.models import load_model
from effref.peft import load_trainable, trainable_state_dict
from effref.peft.core import merge_adapters, unmerge_adapters
from effref.peft.tied_lora import TiedLoraConfig, TiedLoraLinear, apply_tied_lora


def tiny():
    return load_model("tiny-llama", seed=0).model


def ids():
    return torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))


def perturb(model):
    with torch.no_grad():
        for i, m in enumerate(m for m in model.modules() if isinstance(m, TiedLoraLinear)):
            m.v.copy_(torch.randn(m.v.shape, generator=torch.Generator().manual_seed(i)))


def test_factors_are_shared_across_layers_and_counted_once():
    model = apply_tied_lora(tiny(), TiedLoraConfig(r=4))
    q0, q1 = model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.q_proj
    assert q0.shared.A is q1.shared.A and q0.shared.B is q1.shared.B
    assert q0.u is not q1.u
    # shared: q (4·64 + 64·4) + v (4·64 + 32·4); per layer: u (4) + v_q (64) + u (4) + v_v (32)
    assert parameter_count(model, trainable_only=True) == (512 + 384) + 2 * (4 + 64 + 4 + 32)
    frozen_ab = apply_tied_lora(tiny(), TiedLoraConfig(r=4, train_ab=False))
    assert parameter_count(frozen_ab, trainable_only=True) == 2 * (4 + 64 + 4 + 32)


def test_tied_lora_is_identity_at_init_and_follows_its_formula():
    base = tiny()
    model = apply_tied_lora(copy.deepcopy(base), TiedLoraConfig(r=4, alpha=8))
    torch.testing.assert_close(model(ids()).logits, base(ids()).logits)
    perturb(model)
    layer = model.model.layers[1].self_attn.v_proj
    x = torch.randn(3, 64)
    A, B = layer.shared.A, layer.shared.B
    expected = layer.base(x) + 2.0 * x @ (torch.diag(layer.v) @ B @ torch.diag(layer.u) @ A).T
    torch.testing.assert_close(layer(x), expected)


def test_gradients_of_a_shared_matrix_add_up_over_layers():
    model = apply_tied_lora(tiny(), TiedLoraConfig(r=4))
    perturb(model)
    model(ids(), labels=ids()).loss.backward()
    grad_a = model.model.layers[0].self_attn.q_proj.shared.A.grad
    assert grad_a is not None and grad_a.abs().sum() > 0


def test_merge_unmerge_and_save_load_are_exact():
    model = apply_tied_lora(tiny(), TiedLoraConfig(r=4, train_ab=False))
    perturb(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    out = model(ids()).logits
    merge_adapters(model, TiedLoraLinear)
    torch.testing.assert_close(model(ids()).logits, out, rtol=1e-5, atol=1e-5)
    unmerge_adapters(model, TiedLoraLinear)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    other = apply_tied_lora(tiny(), TiedLoraConfig(r=4, train_ab=False))  # different random A, B
    load_trainable(other, trainable_state_dict(model))
    assert torch.equal(other(ids()).logits, model(ids()).logits)


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "r=0 must be a positive"),
    ({"r": 33}, "r=33 exceeds"),
    ({"train_ab": False, "train_uv": False}, "nothing to train"),
    ({"target_modules": ("wq",)}, "match no linear layer"),
])
def test_tied_lora_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        apply_tied_lora(tiny(), TiedLoraConfig(**kwargs))


def test_tying_layers_of_different_shapes_is_refused():
    model = nn.ModuleDict({"a": nn.Sequential(nn.Linear(8, 8)), "b": nn.Sequential(nn.Linear(4, 8))})
    with pytest.raises(ValueError, match="differ in shape"):
        apply_tied_lora(model, TiedLoraConfig(r=2, target_modules=("0",)))
