"""Hyena and RetNet language models: causal, RetNet's parallel training form equals its recurrent form, errors."""

import pytest
import torch

from effref.alternatives.hyena import HyenaOperator
from effref.alternatives.mixer_lm import MixerLM, MixerLMConfig, ParallelRetention
from effref.longcontext.retnet import MultiScaleRetention


def tiny(mixer: str, **kw) -> MixerLM:
    torch.manual_seed(0)
    return MixerLM(MixerLMConfig(**({"mixer": mixer, "vocab_size": 50, "d_model": 16, "n_layers": 2, "d_ff": 32,
                                     "max_len": 64} | kw))).eval()


@pytest.mark.parametrize("mixer, kind", [("hyena", HyenaOperator), ("retnet", ParallelRetention)])
def test_logits_never_read_the_future(mixer, kind):
    model = tiny(mixer)
    assert all(isinstance(block.mixer, kind) for block in model.blocks)
    ids = torch.randint(0, 50, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert a.shape == (2, 20, 50)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-5, rtol=1e-5)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3  # and the changed tokens do matter


def test_retnet_lm_trains_in_parallel_form_what_the_recurrence_computes():
    model = tiny("retnet")
    ids = torch.randint(0, 50, (2, 15))
    with torch.no_grad():
        x = model.embed(ids)
        for block in model.blocks:  # every block again, with retention run token by token from its state
            y, _ = MultiScaleRetention.forward(block.mixer, block.mixer_norm(x), form="recurrent")
            x = x + y
            x = x + block.ffn(block.ffn_norm(x))
        recurrent = model.norm(x) @ model.embed.weight.T
        torch.testing.assert_close(model(ids), recurrent, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mixer", ["hyena", "retnet"])
def test_a_few_steps_learn_a_repeating_pattern(mixer):
    model = tiny(mixer).train()
    ids = torch.arange(8).repeat(4, 6)  # (4, 48): 0 1 … 7 0 1 …
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).reshape(-1, 50), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.parametrize("kwargs, match", [
    ({"mixer": "attention"}, "mixer='attention'"),
    ({"d_model": 0}, "d_model=0"),
    ({"n_heads": 3}, "n_heads=3"),  # retention's heads must divide d_model
])
def test_bad_configuration_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**({"mixer": "retnet"} | kwargs))


def test_too_long_or_bad_ids_are_refused():
    model = tiny("hyena")
    with pytest.raises(ValueError, match="max_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="vocabulary"):
        model(torch.full((1, 4), 50))
