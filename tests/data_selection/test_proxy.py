"""The tiny next-byte model's data plumbing: windows, mixtures, training and evaluation."""

from __future__ import annotations

import math

import pytest
import torch

from effref.data_selection import (
    TinyNextTokenLM,
    mean_loss,
    mixture_batch,
    sample_windows,
    text_bytes,
    train_lm,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_windows_are_contiguous_and_the_target_is_the_next_byte():
    ids = text_bytes("abcdefghij")
    assert ids.tolist() == list(b"abcdefghij")
    inputs, targets = sample_windows(ids, 50, 3, torch.Generator().manual_seed(0))
    for window, target in zip(inputs.tolist(), targets.tolist()):
        assert window == list(range(window[0], window[0] + 3)) and target == window[0] + 3
    with pytest.raises(ValueError, match=r"ids has 3 tokens; sampling windows of context=3 needs more"):
        sample_windows(ids[:3], 1, 3, torch.Generator())


def test_mixture_batch_draws_domains_in_proportion_to_the_weights():
    domains = [torch.zeros(100, dtype=torch.long), torch.ones(100, dtype=torch.long)]
    _, targets = mixture_batch(domains, torch.tensor([0.8, 0.2]), 4000, 2, torch.Generator().manual_seed(0))
    share = targets.float().mean().item()  # the fraction drawn from domain 1
    assert abs(share - 0.2) < 4.5 * math.sqrt(0.2 * 0.8 / 4000)


def test_training_learns_a_periodic_text_to_near_zero_loss():
    torch.manual_seed(0)
    model = TinyNextTokenLM(context=4, dim=8, hidden=32)
    ids = text_bytes("abcd" * 200)
    before = mean_loss(model, ids, 256)
    losses = train_lm(model, lambda g: sample_windows(ids, 32, 4, g), steps=150, lr=1e-2)
    assert len(losses) == 150 and before > math.log(256) - 1 and mean_loss(model, ids, 256) < 0.05
