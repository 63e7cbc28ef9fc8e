"""Perplexity filtering: per-document perplexity against a direct loop, and the three keep modes."""

from __future__ import annotations

import math

import pytest
import torch

from effref.data_selection import (
    TinyNextTokenLM,
    byte_perplexities,
    perplexity_filter,
    sample_windows,
    text_bytes,
    train_lm,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_perplexity_is_the_exp_of_the_mean_next_byte_loss():
    torch.manual_seed(0)
    model = TinyNextTokenLM(context=3, dim=4, hidden=8)
    texts = ["hello world", "abcabcabc!"]
    ours = byte_perplexities(model, texts)
    for text, ppl in zip(texts, ours.tolist()):
        data = list(text.encode())
        losses = []
        for t in range(3, len(data)):
            logits = model(torch.tensor([data[t - 3:t]]))[0]
            losses.append(-torch.log_softmax(logits.double(), -1)[data[t]].item())
        assert math.isclose(ppl, math.exp(sum(losses) / len(losses)), rel_tol=1e-6)


def test_a_reference_trained_on_one_text_prefers_it():
    torch.manual_seed(0)
    model = TinyNextTokenLM(context=2, dim=8, hidden=32)
    ids = text_bytes("the cat sat on the mat. " * 40)
    train_lm(model, lambda g: sample_windows(ids, 64, 2, g), steps=150, lr=1e-2)
    ppl = byte_perplexities(model, ["the mat sat on the cat. ", "import os, sys; x = 1"])
    assert ppl[0] < ppl[1] / 5


@pytest.mark.parametrize("keep, expected", [("lowest", [1, 3]), ("highest", [4, 0]), ("middle", [2, 5])])
def test_keep_modes_pick_the_right_slice(keep, expected):
    perplexities = torch.tensor([50.0, 2.0, 20.0, 10.0, 80.0, 30.0])  # sorted: 1, 3, 2, 5, 0, 4
    assert sorted(perplexity_filter(perplexities, 2 / 6, keep).tolist()) == sorted(expected)


@pytest.mark.parametrize("call, message", [
    (lambda: perplexity_filter(torch.ones(4), 0.0), r"ratio=0.0 must lie in \(0, 1\]"),
    (lambda: perplexity_filter(torch.ones(4), 1.2), r"ratio=1.2 must lie in \(0, 1\]"),
    (lambda: perplexity_filter(torch.ones(0), 0.5), r"pool is empty"),
    (lambda: perplexity_filter(torch.ones(4), 0.5, keep="median"), r"keep='median' is not known"),
    (lambda: perplexity_filter(torch.ones(2, 2), 0.5), r"perplexities must be 1-D"),
    (lambda: byte_perplexities(TinyNextTokenLM(context=8), []), r"list of texts is empty"),
    (lambda: byte_perplexities(TinyNextTokenLM(context=8), ["short"]), r"too short to score with context=8"),
])
def test_bad_inputs_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
