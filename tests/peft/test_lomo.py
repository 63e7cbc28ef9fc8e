"""LOMO: the fused in-backward update equals torch.optim.SGD on the same gradients, and keeps no gradients."""

import copy

import pytest
import torch

from effref.models import load_model
from effref.peft.lomo import Lomo, LomoConfig


def _loss(model, ids):
    return model(ids, labels=ids).loss


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama", seed=0).model.train()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lomo_update_equals_sgd(tiny, weight_decay):
    """Three steps of LOMO and of SGD (no momentum) from the same weights on the same batches agree exactly."""
    ref, fused = copy.deepcopy(tiny), copy.deepcopy(tiny)
    assert ref.lm_head.weight is ref.model.embed_tokens.weight  # tied: one parameter, two uses
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05, weight_decay=weight_decay)
    lomo = Lomo(fused, LomoConfig(lr=0.05, weight_decay=weight_decay))
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, 256, (2, 16), generator=gen)
        sgd.zero_grad()
        _loss(ref, ids).backward()
        sgd.step()
        _loss(fused, ids).backward()
    n_params = len(list(fused.parameters()))
    assert lomo.updates == 3 * n_params
    for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-7, msg=name)
    assert all((a - b).abs().max() > 0 for a, b in zip(ref.parameters(), tiny.parameters()))  # it trained


def test_lomo_leaves_no_gradient_and_only_updates_trainable(tiny):
    model = copy.deepcopy(tiny)
    frozen = model.model.layers[0].self_attn.q_proj.weight
    frozen.requires_grad_(False)
    before = frozen.clone()
    Lomo(model, LomoConfig(lr=0.1))
    _loss(model, torch.randint(0, 256, (1, 8))).backward()
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(frozen, before, rtol=0, atol=0)


def test_lomo_clip_value_clamps_each_gradient_element(tiny):
    ref, fused = copy.deepcopy(tiny), copy.deepcopy(tiny)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    _loss(ref, ids).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad.clamp(-1e-3, 1e-3)
    Lomo(fused, LomoConfig(lr=0.1, clip_value=1e-3))
    _loss(fused, ids).backward()
    for a, b in zip(ref.parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-7)


def test_lomo_remove_restores_normal_backward(tiny):
    model = copy.deepcopy(tiny)
    lomo = Lomo(model, LomoConfig(lr=0.1))
    lomo.remove()
    before = [p.clone() for p in model.parameters()]
    _loss(model, torch.randint(0, 256, (1, 8))).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": 0.0}, "lr=0.0 must be > 0"),
    ({"weight_decay": -1.0}, "weight_decay=-1.0 must be >= 0"),
    ({"clip_value": 0.0}, "clip_value=0.0 must be > 0"),
])
def test_lomo_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LomoConfig(**kwargs)


def test_lomo_rejects_frozen_model_and_non_module():
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Lomo(frozen)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        Lomo(torch.zeros(2))
