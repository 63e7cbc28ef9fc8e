"""DoReMi: the exponentiated-gradient step against its formula, and Group DRO on a constructed case."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from effref.data_selection import TinyNextTokenLM, doremi_update, doremi_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def test_update_is_the_papers_formula_and_favours_the_largest_excess_loss():
    weights, excess = [0.5, 0.3, 0.2], [0.1, 0.6, 0.2]
    step, c = 2.0, 0.01
    tilted = [w * math.exp(step * e) for w, e in zip(weights, excess)]
    expected = [(1 - c) * t / sum(tilted) + c / 3 for t in tilted]
    ours = doremi_update(torch.tensor(weights, dtype=torch.float64), torch.tensor(excess, dtype=torch.float64),
                         step, c)
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float64))
    gains = ours - torch.tensor(weights, dtype=torch.float64)
    assert gains.argmax() == 1 and gains[0] < 0
    uniform = doremi_update(torch.full((3,), 1 / 3), torch.full((3,), 0.7))
    torch.testing.assert_close(uniform, torch.full((3,), 1 / 3))  # equal excess: nothing moves


VOCAB = 16


def constructed_batch(domain: int, generator: torch.Generator, batch: int = 64):
    """Domain 0: target always 0 (easy). Domain 1: (x0 + x1) mod V (learnable, slow). Domain 2: noise."""
    inputs = torch.randint(0, VOCAB, (batch, 3), generator=generator)
    inputs[:, 2] = domain  # the domain is visible to the model
    targets = [torch.zeros(batch, dtype=torch.long), (inputs[:, 0] + inputs[:, 1]) % VOCAB,
               torch.randint(0, VOCAB, (batch,), generator=generator)][domain]
    return inputs, targets


class Oracle(nn.Module):
    """The best reference possible: certain on domains 0 and 1, uniform on the noise of domain 2."""

    def forward(self, inputs):
        logits = torch.zeros(len(inputs), VOCAB)
        answers = torch.where(inputs[:, 2] == 0, 0, (inputs[:, 0] + inputs[:, 1]) % VOCAB)
        certain = inputs[:, 2] != 2
        logits[certain, answers[certain]] = 30.0
        return logits


def test_group_dro_moves_weight_to_the_domain_with_the_largest_excess_loss():
    torch.manual_seed(0)
    proxy = TinyNextTokenLM(vocab_size=VOCAB, context=3, dim=8, hidden=64)
    result = doremi_weights(proxy, Oracle(), constructed_batch, num_domains=3, steps=150, lr=1e-2, seed=0)
    assert result.history.shape == (150, 3) and result.excess.shape == (150, 3)
    torch.testing.assert_close(result.weights, result.history.mean(0))
    torch.testing.assert_close(result.history.sum(1), torch.ones(150))
    late_excess = result.excess[-50:].mean(0)
    assert late_excess.argmax() == 1  # the slow-to-learn domain keeps the largest excess loss
    assert result.weights.argmax() == 1 and result.weights[1] > 0.5
    assert result.weights[2] < 1 / 3  # noise the reference cannot beat earns no extra weight


@pytest.mark.parametrize("call, message", [
    (lambda: doremi_update(torch.tensor([0.5, 0.5]), torch.zeros(3)), r"must be the same 1-D shape"),
    (lambda: doremi_update(torch.tensor([0.7, 0.7]), torch.zeros(2)), r"probability vector"),
    (lambda: doremi_update(torch.tensor([0.5, 0.5]), torch.zeros(2), smoothing=2), r"smoothing=2 must lie"),
    (lambda: doremi_weights(nn.Linear(1, 1), Oracle(), constructed_batch, 1, 5), r"num_domains=1 must be"),
    (lambda: doremi_weights(nn.Linear(1, 1), Oracle(), constructed_batch, 3, 0), r"steps=0 must be"),
])
def test_bad_inputs_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
