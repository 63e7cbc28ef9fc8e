"""SkipDecode against brute force: a cached, per-layer-filled decode must equal a cache-free pass in which the
skipped blocks simply leave those tokens' hidden states alone; with no skipping it is plain decoding."""

from __future__ import annotations

import itertools

import pytest
import torch

from effref.inference.drafts import layer_skip_draft
from effref.inference.skipdecode import SkipDecodeConfig, exit_schedule, skipdecode_generate, skipdecode_nll


@torch.no_grad()
def nll_by_hand(model, ids: torch.Tensor, prompt_len: int, schedule: list[int], skip: str) -> torch.Tensor:
    """No cache: block l updates token t's hidden state only if t is in the prompt or runs block l."""
    L, T = model.cfg.n_layers, ids.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    counts = [L] * prompt_len + schedule + schedule[-1:]  # the prompt runs every block; the last token is only
    runs = [set(range(L - c, L) if skip == "lower" else range(c)) for c in counts]  # a target: any count
    x = model.embed(ids)
    for layer, block in enumerate(model.blocks):
        who = [t for t in range(T) if layer in runs[t]]  # a causal prefix of tokens, as the schedule decays
        assert who == list(range(len(who)))
        x[:, :len(who)] = block(x[:, :len(who)], cos[:len(who)], sin[:len(who)])
    logp = model.lm_head(model.norm(x)).float().log_softmax(-1)
    return -logp[:, prompt_len:-1].gather(-1, ids[:, prompt_len + 1:, None])[..., 0]


@pytest.mark.parametrize("skip", ["lower", "upper"])
@pytest.mark.parametrize("max_layers, min_layers", [(4, 1), (3, 2), (2, 2)])
def test_skipdecode_equals_a_cache_free_pass(tiny_llama, random_ids, skip, max_layers, min_layers) -> None:
    model, ids = tiny_llama(n_layers=4, scale=1.0), random_ids(2, 16)
    config = SkipDecodeConfig(max_layers, min_layers, skip)
    nll, schedule = skipdecode_nll(model, ids, 5, config, progress=False)
    torch.testing.assert_close(nll, nll_by_hand(model, ids, 5, schedule, skip), rtol=1e-4, atol=1e-4)


def test_no_skipping_is_plain_decoding(tiny_llama, random_ids) -> None:
    model = tiny_llama(n_layers=4)
    prompt = random_ids(2, 6)
    tokens, schedule = skipdecode_generate(model, prompt, 12, SkipDecodeConfig(4, 4))
    assert torch.equal(tokens, model.generate(prompt, 12)) and schedule == [4] * 11


def test_constant_upper_skip_is_the_truncated_model_after_the_prefill(tiny_llama, random_ids) -> None:
    model, ids = tiny_llama(n_layers=4, scale=1.0), random_ids(1, 14)
    nll, _ = skipdecode_nll(model, ids, 5, SkipDecodeConfig(2, 2, "upper"), progress=False)
    with torch.no_grad():  # blocks 0-1 of the prompt are the same in both; blocks 2-3 are never read after it
        logp = layer_skip_draft(model, 2)(ids).float().log_softmax(-1)
    torch.testing.assert_close(nll, -logp[:, 5:-1].gather(-1, ids[:, 6:, None])[..., 0], rtol=1e-4, atol=1e-4)


def test_schedule_decays_linearly_and_never_grows() -> None:
    schedule = exit_schedule(11, SkipDecodeConfig(30, 10), 30)
    assert schedule[0] == 30 and schedule[-1] == 10 and schedule[5] == 20
    assert all(a >= b for a, b in itertools.pairwise(schedule))
    assert exit_schedule(1, SkipDecodeConfig(8, 4), 8) == [8]


@pytest.mark.parametrize("kwargs, message", [
    ({"max_layers": 2, "min_layers": 3}, "min_layers=3, max_layers=2"),
    ({"max_layers": 2, "min_layers": 0}, "min_layers=0"),
    ({"max_layers": 2, "min_layers": 1, "skip": "middle"}, "skip='middle'"),
])
def test_bad_configs_are_rejected(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SkipDecodeConfig(**kwargs)


def test_more_layers_than_the_model_are_rejected(tiny_llama, random_ids) -> None:
    with pytest.raises(ValueError, match="max_layers=5 exceeds the model's n_layers=3"):
        skipdecode_generate(tiny_llama(), random_ids(1, 4), 4, SkipDecodeConfig(5, 1))
