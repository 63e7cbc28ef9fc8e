"""Activation checkpointing gives the plain run's gradients (dropout included) while keeping fewer activations."""

import pytest
import torch
from torch import nn

from effref.distributed import checkpoint, checkpoint_modules, saved_activation_bytes


def blocks(seed=0, dropout=0.3):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Dropout(dropout), nn.Linear(64, 16))
                           for _ in range(4)])


def grads_after(model, x, rng_seed=1):
    torch.manual_seed(rng_seed)  # the dropout masks
    model(x).pow(2).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_checkpointed_gradients_equal_the_plain_run_and_torch_checkpoint():
    x = torch.randn(8, 16, requires_grad=True)
    plain = grads_after(blocks(), x)
    ours = blocks()
    checkpoint_modules(list(ours))
    theirs = blocks()
    for block in theirs:
        block.forward = lambda h, f=block.forward: torch.utils.checkpoint.checkpoint(f, h, use_reentrant=False)
    for got in (grads_after(ours, x), grads_after(theirs, x)):
        for a, b in zip(got, plain):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_without_restoring_the_random_state_dropout_would_differ():
    # the guard above is not vacuous: two different dropout draws give different gradients
    x = torch.randn(8, 16)
    assert not torch.allclose(grads_after(blocks(), x, rng_seed=1)[0], grads_after(blocks(), x, rng_seed=2)[0])


def test_checkpointing_keeps_only_the_block_inputs():
    x = torch.randn(32, 16, requires_grad=True)
    plain_model, model = blocks(dropout=0.0), blocks(dropout=0.0)
    checkpoint_modules(list(model))
    plain = saved_activation_bytes(lambda: plain_model(x).sum())
    kept = saved_activation_bytes(lambda: model(x).sum())
    assert kept == 4 * x.numel() * 4  # one (32, 16) fp32 input per block
    assert plain > 5 * kept  # each block saves its input, the 64-wide hidden twice, and more


def test_no_grad_forward_skips_the_checkpoint():
    model = blocks()
    checkpoint_modules(list(model))
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 16)).shape == (2, 16)


@pytest.mark.parametrize("call, error, message", [
    (lambda: checkpoint(torch.sin, 3.0), TypeError, "tensor inputs only"),
    (lambda: checkpoint(torch.sin), TypeError, "tensor inputs only"),
    (lambda: checkpoint(torch.sin, torch.ones(2)), ValueError, "no input requires a gradient"),
])
def test_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_a_module_is_checkpointed_once():
    model = blocks()
    checkpoint_modules([model[0]])
    with pytest.raises(ValueError, match="already checkpointed"):
        checkpoint_modules([model[0]])
