"""The shared machinery: PositionalAttention with its default hooks is LLaMA's attention, tables install with
their length, and wrong arguments are refused by name."""

from __future__ import annotations

import pytest
import torch

from effref.longcontext.positions import PositionalAttention, install_rope_tables, swap_attention
from effref.models.llama import rope_tables


def test_default_hooks_reproduce_llamas_attention_with_and_without_cache(make_llama, make_ids):
    model = make_llama()
    x = make_ids(30)
    with torch.no_grad():
        expected = model(x)
        cache = model.new_cache(2, 30)
        expected_steps = torch.cat([model(x[:, :20], cache), model(x[:, 20:], cache)], dim=1)
        swap_attention(model, PositionalAttention)
        assert all(type(b.attn) is PositionalAttention for b in model.blocks)
        got = model(x)
        cache = model.new_cache(2, 30)
        got_steps = torch.cat([model(x[:, :20], cache), model(x[:, 20:], cache)], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_steps, expected_steps, rtol=1e-5, atol=1e-4)


def test_installed_tables_set_the_context_length(make_llama, make_ids):
    model = make_llama()
    x = make_ids(100)
    with pytest.raises(ValueError, match="exceed max_seq_len=64"):
        model(x)
    install_rope_tables(model, *rope_tables(model.cfg.d_head, 128, model.cfg.rope_theta))
    assert model.cfg.max_seq_len == 128 and model.rope_cos.shape == (128, 8)
    with torch.no_grad():
        head = model(x)[:, :64]
        torch.testing.assert_close(head, model(x[:, :64]), rtol=1e-5, atol=1e-4)  # causal: the prefix unchanged


def test_bad_arguments_are_refused_by_name(make_llama):
    model = make_llama()
    with pytest.raises(ValueError, match=r"cos and sin must both have shape \(max_len, d_head=8\)"):
        install_rope_tables(model, torch.ones(10, 16), torch.zeros(10, 16))
    with pytest.raises(TypeError, match="attention must be a PositionalAttention subclass"):
        swap_attention(model, torch.nn.Linear)
    with pytest.raises(TypeError, match="model must be effref's Llama"):
        install_rope_tables(torch.nn.Linear(2, 2), torch.ones(4, 8), torch.zeros(4, 8))
