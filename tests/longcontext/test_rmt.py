"""Recurrent Memory Transformer: the segment layout against our Llama's own forward, and a recall task that only
the memory can solve."""

from __future__ import annotations

import math

import pytest
import torch

from effref.longcontext.rmt import RecurrentMemoryTransformer
from effref.models.llama import Llama, LlamaConfig


def test_a_segment_is_one_causal_pass_over_read_memory_tokens_and_write_memory(make_llama, make_ids):
    """With memory vectors equal to token embeddings, a step is the plain model on [mem ids, segment, mem ids]."""
    model, ids = make_llama(), make_ids(6)
    rmt = RecurrentMemoryTransformer(model, num_memory=3, segment_len=6)
    memory_ids = make_ids(3, seed=7)
    with torch.no_grad():
        logits, new_memory = rmt.step(ids, model.embed(memory_ids))
        layout = torch.cat([memory_ids, ids, memory_ids], 1)
        torch.testing.assert_close(logits, model(layout)[:, 3:9], rtol=1e-5, atol=1e-5)
        hidden = model.embed(layout)
        for block in model.blocks:
            hidden = block(hidden, model.rope_cos[:12], model.rope_sin[:12])
        torch.testing.assert_close(new_memory, hidden[:, 9:])


def test_segment_two_depends_on_segment_one_only_through_the_memory(make_llama, make_ids):
    rmt = RecurrentMemoryTransformer(make_llama(), num_memory=2, segment_len=5)
    ids = make_ids(10)
    changed = ids.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 64
    with torch.no_grad():
        a, b = rmt(ids), rmt(changed)
        assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-4)  # the change reached the next segment
        _, memory = rmt.step(changed[:, :5], rmt.initial_memory(2))
        torch.testing.assert_close(rmt.step(ids[:, 5:], memory)[0], b[:, 5:])  # … and only through the memory


def test_memory_learns_to_carry_a_key_across_segments():
    """Segment 2 must name the key that opened segment 1. Without a channel across segments no model can beat
    the entropy ln K of the key; trained through the memory, the loss falls far below it."""
    torch.manual_seed(0)
    K, L = 8, 4
    model = Llama(LlamaConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64,
                              max_seq_len=16))
    rmt = RecurrentMemoryTransformer(model, num_memory=2, segment_len=L)
    optimizer = torch.optim.Adam(rmt.parameters(), lr=3e-3)
    for _ in range(150):
        key = torch.randint(0, K, (32,))
        ids = torch.cat([key[:, None], torch.randint(K, 16, (32, 2 * L - 1))], 1)  # (32, 2L): key, then noise
        logits = rmt(ids)[:, L:]  # segment 2
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), key.repeat_interleave(L))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3 * math.log(K)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_memory": 0, "segment_len": 4}, "num_memory=0 must be a positive integer"),
    ({"num_memory": 2, "segment_len": -1}, "segment_len=-1 must be a positive integer"),
    ({"num_memory": 20, "segment_len": 30}, "exceed the model's max_seq_len=64"),
])
def test_bad_sizes_are_refused(make_llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecurrentMemoryTransformer(make_llama(), **kwargs)


def test_bad_inputs_are_refused(make_llama):
    rmt = RecurrentMemoryTransformer(make_llama(), 2, 4)
    with pytest.raises(ValueError, match=r"ids must be \(B, T\)"):
        rmt(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="model must be effref's Llama"):
        RecurrentMemoryTransformer(torch.nn.Linear(2, 2), 2, 4)
