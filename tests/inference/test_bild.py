"""BiLD against a brute-force re-implementation of its two policies (no cache, full forward passes), and its
limiting cases: rolling back everything is greedy decoding of the big model."""

from __future__ import annotations

import math

import pytest
import torch

from effref.inference.bild import BiLDConfig, bild_generate, bild_verify
from effref.inference.drafts import layer_skip_draft


@torch.no_grad()
def bild_by_hand(big, little, prompt: list[int], new: int, cfg: BiLDConfig) -> list[int]:
    seq = list(prompt)
    while len(seq) < len(prompt) + new:
        waiting = []
        while len(waiting) < cfg.max_draft:  # fallback policy
            probs = little(torch.tensor([seq + waiting]))[0, -1].softmax(-1)
            if probs.max() < cfg.fallback_threshold:
                break
            waiting.append(int(probs.argmax()))
        log_p = big(torch.tensor([seq + waiting]))[0, len(seq) - 1:].log_softmax(-1)  # (len(waiting) + 1, V)
        for i, y in enumerate(waiting):  # rollback policy
            if -log_p[i, y] > cfg.rollback_threshold:
                seq += waiting[:i] + [int(log_p[i].argmax())]
                break
        else:
            seq += waiting + [int(log_p[-1].argmax())]
    return seq[:len(prompt) + new]


@pytest.mark.parametrize("fallback, rollback", [(0.0, math.inf), (0.5, 2.0), (0.9, 0.5), (0.3, 5.0)])
def test_bild_matches_a_brute_force_reference(tiny_llama, random_ids, fallback: float, rollback: float) -> None:
    big, cfg = tiny_llama(), BiLDConfig(fallback_threshold=fallback, rollback_threshold=rollback, max_draft=5)
    little = layer_skip_draft(big, 1)
    prompt = random_ids(1, 6)
    result = bild_generate(big, little, prompt, 30, cfg)
    assert result.new_tokens.tolist() == bild_by_hand(big, little, prompt[0].tolist(), 30, cfg)[6:]


def test_rolling_back_everything_is_greedy_decoding_of_the_big_model(tiny_llama, random_ids) -> None:
    big = tiny_llama(scale=2.0)  # no probability rounds to 1, so every little-model token is rolled back
    prompt = random_ids(1, 6)
    result = bild_generate(big, layer_skip_draft(big, 1), prompt, 20, BiLDConfig(rollback_threshold=0.0))
    assert torch.equal(result.tokens, big.generate(prompt, 20))
    assert result.emitted == [1] * 20


def test_never_rolling_back_keeps_the_little_models_tokens(tiny_llama, random_ids) -> None:
    big = tiny_llama()
    little = layer_skip_draft(big, 1)
    prompt = random_ids(1, 6)
    cfg = BiLDConfig(fallback_threshold=0.0, rollback_threshold=math.inf, max_draft=4)
    result = bild_generate(big, little, prompt, 10, cfg)
    first_five = little.generate(prompt, 4)[0, 6:].tolist()  # four little tokens, then the big model's
    assert result.new_tokens[:4].tolist() == first_five and result.emitted[0] == 5


def test_bild_verify_rolls_back_at_the_first_confident_disagreement() -> None:
    log_p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]).log()
    assert bild_verify(log_p, torch.tensor([1, 2]), rollback_threshold=2.0) == (2, 2)  # −log 0.2 = 1.6 ≤ 2
    assert bild_verify(log_p, torch.tensor([1, 2]), rollback_threshold=1.0) == (0, 0)  # 1.6 > 1: replace by 0
    assert bild_verify(log_p, torch.tensor([0, 0]), rollback_threshold=1.0) == (1, 2)  # −log 0.1 = 2.3 > 1


@pytest.mark.parametrize("kwargs, message", [
    ({"fallback_threshold": 1.5}, "fallback_threshold=1.5"),
    ({"rollback_threshold": -1.0}, "rollback_threshold=-1.0"),
    ({"max_draft": 0}, "max_draft=0"),
])
def test_bad_configs_are_rejected(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BiLDConfig(**kwargs)


def test_mismatched_vocabularies_are_rejected(tiny_llama, random_ids) -> None:
    with pytest.raises(ValueError, match="draft vocab_size=32"):
        bild_generate(tiny_llama(), tiny_llama(vocab=32), random_ids(1, 4, vocab=32), 5)
