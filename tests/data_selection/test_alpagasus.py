"""AlpaGasus-style grading: the expected rating against a direct softmax, and the filter's two modes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from effref.data_selection import (
    LIKELIHOOD_PROMPT,
    RATING_PROMPT,
    alpagasus_filter,
    grader_scores,
    response_log_likelihood,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class CharTokenizer:
    """One id per character (its code point mod 128); enough for a grader's prompt."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 128 for c in text]}


class LengthGrader(nn.Module):
    """Logits that favour the digit of (prompt length mod 5) + 1, so pairs get different ratings."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, ids):
        logits = torch.zeros(1, ids.shape[1], 128)
        logits[0, -1, ord("1") + ids.shape[1] % 5] = self.scale
        logits[0, -1, ord("x")] = 50.0  # a non-digit token: must be ignored by the renormalization
        return SimpleNamespace(logits=logits)


def test_scores_are_the_expected_rating_over_the_digit_tokens():
    pairs = [("Add 2 and 2.", "4"), ("Name a colour.", "Blue, like the sky."), ("Say hi.", "")]
    scores = grader_scores(LengthGrader(), CharTokenizer(), pairs)
    for (instruction, response), score in zip(pairs, scores.tolist()):
        length = len(RATING_PROMPT.format(instruction=instruction, response=response))
        favoured = length % 5 + 1
        weights = {r: math.exp(2.0 if r == favoured else 0.0) for r in range(1, 6)}
        expected = sum(r * w for r, w in weights.items()) / sum(weights.values())
        assert math.isclose(score, expected, rel_tol=1e-9)


def test_filter_by_threshold_or_by_ratio():
    scores = torch.tensor([4.6, 2.0, 4.5, 3.9, 5.0])
    assert alpagasus_filter(scores, threshold=4.5).tolist() == [0, 2, 4]
    assert alpagasus_filter(scores, ratio=0.4).tolist() == [4, 0]
    assert alpagasus_filter(scores, threshold=5.5).tolist() == []


@pytest.mark.parametrize("kwargs, message", [
    ({}, r"pass exactly one of threshold"),
    ({"threshold": 4.5, "ratio": 0.5}, r"pass exactly one of threshold"),
    ({"ratio": 0.0}, r"ratio=0.0 must lie in \(0, 1\]"),
    ({"ratio": 1.01}, r"ratio=1.01 must lie in \(0, 1\]"),
])
def test_filter_bad_inputs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        alpagasus_filter(torch.tensor([1.0, 2.0]), **kwargs)


def test_empty_inputs_are_named():
    with pytest.raises(ValueError, match=r"scores must be a non-empty 1-D tensor"):
        alpagasus_filter(torch.zeros(0), threshold=4.5)
    with pytest.raises(ValueError, match=r"pairs is empty"):
        grader_scores(LengthGrader(), CharTokenizer(), [])


class WordTokenizer:
    """Splits at spaces, so "…): 4" is one token "4" only after a trailing space — and ") 4" is not."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [hash(word) % 1000 for word in text.split(" ")]}


def test_a_template_whose_digit_is_not_one_extra_token_is_refused():
    with pytest.raises(ValueError, match=r"does not continue the prompt with the digit 1 as one token"):
        grader_scores(LengthGrader(), WordTokenizer(), [("a", "b")], template="{instruction} {response} rating:")


def test_response_log_likelihood_is_the_mean_log_probability_of_the_response_tokens():
    class Bigram(nn.Module):  # logits depend on the current character only: a fixed random table
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(128, 128, generator=torch.Generator().manual_seed(0)))

        def forward(self, ids):
            return SimpleNamespace(logits=self.table[ids])

    model, tokenizer = Bigram(), CharTokenizer()
    pairs = [("Add 2 and 2.", "4"), ("Name a colour.", "Blue.")]
    ours = response_log_likelihood(model, tokenizer, pairs)
    for (instruction, response), score in zip(pairs, ours.tolist()):
        prompt = LIKELIHOOD_PROMPT.format(instruction=instruction)
        text = f"{prompt} {response}"
        log_probs = torch.log_softmax(model.table.double(), dim=-1)
        direct = [log_probs[ord(text[t - 1]), ord(text[t])].item() for t in range(len(prompt), len(text))]
        assert math.isclose(score, sum(direct) / len(direct), rel_tol=1e-9)
    with pytest.raises(ValueError, match=r"pairs is empty"):
        response_log_likelihood(model, tokenizer, [])
