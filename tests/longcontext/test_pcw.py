"""Parallel Context Windows against a brute-force forward with the paper's attention mask and position ids."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effref.longcontext.pcw import parallel_context_cache, pcw_generate, pcw_logits
from effref.models.llama import apply_rope


def masked_forward(model, ids, positions, mask):
    """Our Llama's computation written out, with an explicit (T, T) attention mask and position per token."""
    B, T = ids.shape
    cos, sin = model.rope_cos[positions], model.rope_sin[positions]  # (T, d_head)
    x = model.embed(ids)
    for block in model.blocks:
        a, h = block.attn, block.attn_norm(x)
        q, k, v = (proj(h).view(B, T, -1, a.d_head).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        groups = a.n_heads // a.n_kv_heads
        y = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                           attn_mask=mask)
        x = x + a.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        x = x + block.mlp(block.mlp_norm(x))
    return model.lm_head(model.norm(x))


def pcw_mask_and_positions(sizes, n_task):
    """The paper's Fig. 1: block-diagonal causal windows at positions 0..C_w−1; task tokens see everything."""
    n_context, C = sum(sizes), max(sizes)
    T = n_context + n_task
    mask = torch.zeros(T, T, dtype=torch.bool)
    positions, start = [], 0
    for size in sizes:
        mask[start:start + size, start:start + size] = torch.ones(size, size, dtype=torch.bool).tril()
        positions += range(size)
        start += size
    mask[n_context:, :n_context] = True
    mask[n_context:, n_context:] = torch.ones(n_task, n_task, dtype=torch.bool).tril()
    return mask, torch.tensor(positions + list(range(C, C + n_task)))


def test_pcw_equals_the_masked_forward(make_llama, make_ids):
    model, sizes = make_llama(), [5, 7, 3]
    ids = make_ids(sum(sizes) + 4)
    windows = list(ids[:, :sum(sizes)].split(sizes, dim=1))
    mask, positions = pcw_mask_and_positions(sizes, 4)
    with torch.no_grad():
        expected = masked_forward(model, ids, positions, mask)[:, sum(sizes):]
        torch.testing.assert_close(pcw_logits(model, windows, ids[:, sum(sizes):]), expected, rtol=1e-4, atol=1e-4)


def test_one_window_is_the_plain_model_and_window_order_does_not_matter(make_llama, make_ids):
    model, ids = make_llama(), make_ids(24)
    windows, task = list(ids[:, :18].split(6, dim=1)), ids[:, 18:]
    with torch.no_grad():
        torch.testing.assert_close(pcw_logits(model, [ids[:, :18]], task), model(ids)[:, 18:], rtol=1e-4, atol=1e-4)
        parallel = pcw_logits(model, windows, task)
        torch.testing.assert_close(pcw_logits(model, windows[::-1], task), parallel, rtol=1e-4, atol=1e-4)
        sequential = model(torch.cat([*windows[::-1], task], 1))[:, 18:]
        assert not torch.allclose(sequential, model(ids)[:, 18:], atol=1e-3)  # a plain model does care


def test_generation_continues_the_task_greedily(make_llama, make_ids):
    model, ids = make_llama(), make_ids(20)
    windows, task = list(ids[:, :16].split(8, dim=1)), ids[:, 16:]
    new = pcw_generate(model, windows, task, 3)
    with torch.no_grad():  # each generated token is the argmax after the windows, task and earlier tokens
        for step in range(3):
            logits = pcw_logits(model, windows, torch.cat([task, new[:, :step]], 1))[:, -1]
            assert torch.equal(new[:, step], logits.argmax(-1))
    cache = parallel_context_cache(model, windows, max_new=1)
    assert cache.length == 8 and cache.stored == 16  # next position 8, keys of both windows stored


def test_bad_inputs_are_refused(make_llama, make_ids):
    model, ids = make_llama(), make_ids(10)
    with pytest.raises(ValueError, match="non-empty list"):
        parallel_context_cache(model, [], 4)
    with pytest.raises(ValueError, match="same B and C_w >= 1"):
        parallel_context_cache(model, [ids, ids[:1]], 4)
    with pytest.raises(ValueError, match="max_new=0 must be a positive integer"):
        parallel_context_cache(model, [ids], 0)
    with pytest.raises(ValueError, match="exceed max_seq_len=64"):
        parallel_context_cache(model, [make_ids(60)], 8)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        pcw_generate(model, [ids], ids[:, :2], 0)
    with pytest.raises(ValueError, match="overflow"):
        model(ids[:, :3], parallel_context_cache(model, [ids], 2))
