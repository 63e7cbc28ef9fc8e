"""PEQA: the layer starts at round-to-nearest, only the scales train, and their gradient is the chain rule's."""

import copy

import pytest
import torch

from effref.models import load_model
from effref.peft.peqa import GroupQuantLinear, PeqaConfig, apply_peqa, peqa_layer
from effref.quantization.basics import QuantConfig, fake_quantize


@pytest.mark.parametrize("group_size", [None, 32])
def test_peqa_layer_starts_at_round_to_nearest(group_size):
    linear = torch.nn.Linear(128, 24)
    layer = peqa_layer(linear, PeqaConfig(bits=4, group_size=group_size))
    cfg = QuantConfig(bits=4, granularity="group", group_size=group_size or 128, scale_dtype=torch.float32)
    torch.testing.assert_close(layer.dequantized_weight(), fake_quantize(linear.weight.detach(), cfg))
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["scale"]
    assert layer.scale.shape == (24, 128 // (group_size or 128))


def test_scale_gradient_matches_autograd_through_the_dequantized_weight():
    """Our backward never forms W as a graph node; compare with plain autograd on s ⊙ (Q − z)."""
    layer = peqa_layer(torch.nn.Linear(64, 16), PeqaConfig(bits=3, group_size=16))
    x = torch.randn(2, 5, 64, requires_grad=True)
    layer(x).sin().sum().backward()
    scale = layer.scale.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    w_ref = scale.repeat_interleave(16, dim=1) * layer.centred_codes()
    torch.nn.functional.linear(x_ref, w_ref, layer.bias).sin().sum().backward()
    torch.testing.assert_close(layer.scale.grad, scale.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_apply_peqa_trains_only_scales_and_keeps_codes():
    model = apply_peqa(copy.deepcopy(load_model("tiny-llama", seed=0).model), PeqaConfig(bits=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".scale") for n in trainable)
    layers = [m for m in model.modules() if isinstance(m, GroupQuantLinear)]
    assert len(layers) == 14
    codes = [m.codes.clone() for m in layers]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert all(torch.equal(c, m.codes) for c, m in zip(codes, layers))


@pytest.mark.parametrize("call, error, message", [
    (lambda: PeqaConfig(bits=1), ValueError, "bits=1 is not supported"),
    (lambda: PeqaConfig(group_size=0), ValueError, "group_size=0 must be a positive integer"),
    (lambda: GroupQuantLinear(torch.nn.Linear(100, 4), group_size=64), ValueError,
     "group_size=64 does not divide in_features=100"),
    (lambda: GroupQuantLinear(torch.nn.Embedding(4, 4)), TypeError, "got Embedding"),
    (lambda: apply_peqa(torch.nn.Sequential(torch.nn.Linear(4, 4)), PeqaConfig(target_modules=("q_proj",))),
     ValueError, "match no linear layer"),
])
def test_peqa_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()
