"""Gist tokens: the mask by brute force, the model sees the prompt only through the gist, and training works."""

import pytest
import torch
from prompting.helpers import tiny_llama

from effref.prompting import (
    GistTokens,
    continue_after,
    forward_embeds,
    gist_cache,
    gist_logits,
    gist_mask,
    train_gist,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gist_mask_equals_the_rule_written_out():
    P, G, R = 3, 2, 4
    mask = gist_mask(P, G, R)
    for i in range(P + G + R):
        for j in range(P + G + R):
            assert bool(mask[i, j]) == (j <= i and not (i >= P + G and j < P)), (i, j)


def test_later_tokens_depend_on_the_prompt_only_through_the_gist_cache():
    """Logits after the gist from the full masked forward equal those computed from the G cached gist positions
    alone, so a prompt changes them only by changing the gist positions' keys and values."""
    model = tiny_llama()
    gist = GistTokens(model, 2)
    g = torch.Generator().manual_seed(0)
    prompt, rest = torch.randint(0, 128, (2, 7), generator=g), torch.randint(0, 128, (2, 5), generator=g)
    with torch.no_grad():
        full = gist_logits(model, gist, prompt, rest)
        cache = gist_cache(model, gist, prompt)
    assert cache[0][0].shape[2] == 2  # the prompt's 7 positions became 2
    torch.testing.assert_close(continue_after(model, cache, 7, rest), full)
    other = torch.randint(0, 128, (2, 7), generator=g)
    with torch.no_grad():
        assert not torch.allclose(gist_logits(model, gist, other, rest), full)  # the prompt reaches them via the gist


def test_perturbing_the_prompt_moves_later_logits_without_the_mask_but_not_past_a_blocked_gist():
    """With the gist rows also blind to the prompt, nothing after the prompt can change when it changes."""
    model = tiny_llama()
    gist = GistTokens(model, 2)
    g = torch.Generator().manual_seed(1)
    prompt, other, rest = (torch.randint(0, 128, (1, n), generator=g) for n in (6, 6, 4))
    with torch.no_grad():
        def logits(p, mask):
            embeds = torch.cat([model.embed(p), gist.embeddings[None], model.embed(rest)], dim=1)
            return forward_embeds(model, embeds, mask)[:, 8:]
        blind = gist_mask(6, 2, 4)
        blind[6:8, :6] = False
        torch.testing.assert_close(logits(prompt, blind), logits(other, blind))
        assert not torch.allclose(logits(prompt, None), logits(other, None))


def test_trained_gist_tokens_carry_the_prompt_to_the_answer():
    """Toy task: the prompt is a random key token; after the gist, the model must repeat it. Under the gist
    mask the key is reachable only through the gist tokens, so success means they learned to hold it."""
    model = tiny_llama(vocab_size=24, n_layers=2, seed=3)
    gist = GistTokens(model, 1)
    keys = torch.arange(4, 20)  # 16 possible keys: chance accuracy 1/16

    def batch(step):
        g = torch.Generator().manual_seed(step)
        key = keys[torch.randint(len(keys), (32,), generator=g)]
        prompt = torch.stack([torch.full_like(key, 1), key], dim=1)  # (B, 2): "repeat:" key
        rest = torch.stack([torch.full_like(key, 2), key], dim=1)  # (B, 2): "answer:" key
        return prompt, rest, torch.tensor([[0.0, 1.0]]).expand(32, 2)

    losses = train_gist(model, gist, batch, steps=150, lr=1e-2)
    prompt, rest, _ = batch(10_000)
    with torch.no_grad():
        predicted = gist_logits(model, gist, prompt, rest)[:, 0].argmax(-1)  # position "answer:" predicts the key
    accuracy = float((predicted == rest[:, 1]).float().mean())
    assert losses[-1] < 0.5 * losses[0] and accuracy > 0.8


@pytest.mark.parametrize("call, message", [
    (lambda m: gist_mask(0, 1, 2), "need a prompt"),
    (lambda m: gist_mask(2, 0, 2), "at least one gist token"),
    (lambda m: GistTokens(m, 0), "n_gist=0"),
    (lambda m: gist_logits(m, GistTokens(m, 1), torch.zeros(2, 3, dtype=torch.long), torch.zeros(1, 2,
                                                                                                 dtype=torch.long)),
     "the same B"),
    (lambda m: train_gist(m, GistTokens(m, 1), lambda s: None, steps=0), "steps=0"),
])
def test_bad_input_is_refused_with_the_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_llama())
