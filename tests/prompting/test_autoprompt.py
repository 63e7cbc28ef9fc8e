"""AutoPrompt finds a planted trigger on a toy model, and runs on our Llama through forward_embeds."""

import pytest
import torch
from prompting.helpers import tiny_llama
from torch import nn

from effref.prompting import autoprompt, forward_embeds

pytestmark = pytest.mark.usefixtures("one_thread")


class BagOfEmbeddings(nn.Module):
    """logits at every position = W · (mean of the input embeddings so far): a toy LM to plant a trigger in."""

    def __init__(self, vocab: int = 60, dim: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embedding = 0.3 * torch.randn(vocab, dim, generator=g)
        self.out = torch.randn(vocab, dim, generator=g)

    def forward(self, embeds):  # (B, T, d) -> (B, T, V)
        running = embeds.cumsum(1) / torch.arange(1, embeds.shape[1] + 1)[None, :, None]
        return running @ self.out.T


def test_autoprompt_finds_a_planted_trigger():
    toy = BagOfEmbeddings()
    label, planted = 7, 41
    toy.embedding[planted] = 3.0 * toy.out[label] / toy.out[label].norm()  # token 41 pushes towards label 7
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, 60, (8, 5), generator=g)
    inputs[:, 2] = 0  # the trigger slot
    labels = torch.full((8,), label)
    search = autoprompt(toy, toy.embedding, inputs, [2], labels, steps=3, n_candidates=5, init_token=0)
    assert search.trigger == [planted]
    assert search.losses[-1] < search.losses[0]


def test_autoprompt_lowers_the_label_loss_of_our_llama():
    model = tiny_llama()
    g = torch.Generator().manual_seed(2)
    inputs = torch.randint(0, 128, (4, 8), generator=g)
    labels = torch.tensor([5, 5, 5, 5])
    search = autoprompt(lambda e: forward_embeds(model, e), model.embed.weight, inputs, [1, 3], labels, steps=4,
                        n_candidates=8)
    assert search.losses == sorted(search.losses, reverse=True) and search.losses[-1] < search.losses[0]
    again = autoprompt(lambda e: forward_embeds(model, e), model.embed.weight, inputs, [1, 3], labels, steps=4,
                       n_candidates=8)
    assert again.trigger == search.trigger  # deterministic for a seed


@pytest.mark.parametrize("kwargs, message", [
    ({"trigger_positions": []}, "trigger_positions"),
    ({"trigger_positions": [4]}, "0 .. 3"),
    ({"steps": 0}, "steps=0"),
    ({"n_candidates": 100}, "n_candidates=100"),
    ({"label_ids": torch.zeros(3, dtype=torch.long)}, r"\(B,\)"),
])
def test_bad_input_is_refused_with_the_fix(kwargs, message):
    toy = BagOfEmbeddings()
    args = {"trigger_positions": [1], "label_ids": torch.zeros(2, dtype=torch.long)} | kwargs
    with pytest.raises(ValueError, match=message):
        autoprompt(toy, toy.embedding, torch.zeros(2, 5, dtype=torch.long), **args)
