"""ALiBi: the paper's slopes, the bias against a brute-force loop and against BLOOM's (transformers), and an
ALiBi Llama whose cached decoding equals its full forward pass."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from effref.longcontext.alibi import ALiBiAttention, alibi_bias, alibi_slopes, use_alibi


def test_slopes_for_8_heads_are_the_papers():
    # §3: "For models with 8 heads, the slopes that we used are the geometric sequence 1/2, 1/4, ..., 1/256"
    expected = torch.tensor([1 / 2**h for h in range(1, 9)])
    torch.testing.assert_close(alibi_slopes(8), expected, rtol=0, atol=0)


def test_slopes_for_12_heads_follow_the_non_power_of_two_rule():
    # the 8 slopes of 8 heads, then every other slope of 16 heads: 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5
    expected = [2.0**-h for h in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected), rtol=1e-7, atol=0)


@pytest.mark.parametrize("n_heads", [1, 2, 3, 5, 6, 8, 12, 16, 20, 24, 32, 40, 64, 80, 112])
def test_slopes_equal_bloom_in_transformers(n_heads):
    mask = torch.ones(1, 2)
    bloom = build_alibi_tensor(mask, n_heads, torch.float32)  # (heads, 1, 2): slope · key position
    torch.testing.assert_close(alibi_slopes(n_heads), bloom[:, 0, 1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("T, S", [(5, 5), (1, 7), (3, 9)])
def test_bias_equals_a_brute_force_loop(T, S):
    slopes = alibi_slopes(4)
    expected = torch.empty(4, T, S)
    for h in range(4):
        for t in range(T):
            i = S - T + t  # query t is the (S − T + t)-th token
            for j in range(S):
                expected[h, t, j] = -slopes[h] * (i - j) if j <= i else -math.inf
    torch.testing.assert_close(alibi_bias(4, T, S), expected, rtol=0, atol=0)


def test_alibi_attention_equals_softmax_with_the_bias_by_hand(make_llama):
    model = use_alibi(make_llama())
    attn = model.blocks[0].attn
    assert isinstance(attn, ALiBiAttention)
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        got = attn(x, model.rope_cos[:6], model.rope_sin[:6])
        q = attn.q_proj(x).view(1, 6, 4, 8).transpose(1, 2)  # (1, 4, 6, 8): not rotated
        k = attn.k_proj(x).view(1, 6, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
        v = attn.v_proj(x).view(1, 6, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(8) + alibi_bias(4, 6)  # (1, 4, 6, 6)
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 6, 32)
        expected = attn.o_proj(y)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_alibi_llama_decodes_with_a_cache_as_it_computes_in_one_pass(make_llama, make_ids):
    model = use_alibi(make_llama(), max_len=200).double()  # float64: the weights are large
    assert model.cfg.max_seq_len == 200  # no table limits ALiBi: any length the caller asks for
    x = make_ids(150)  # well past the 64 positions the model was built for
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 150)
        steps = [model(x[:, :100], cache)] + [model(x[:, t:t + 1], cache) for t in range(100, 150)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-9, atol=1e-9)


def test_alibi_has_no_absolute_position(make_llama, make_ids):
    # ALiBi sees distances only: with a slope so steep that only the nearest keys get any weight, the last
    # token's logits are the same after a short context and after the same context with 20 tokens before it
    model = use_alibi(make_llama(n_heads=1, n_kv_heads=1))
    for block in model.blocks:  # slope 40 per position instead of 2^-8 (one head)
        block.attn.bias = lambda T, S, device: alibi_bias(1, T, S, device) * 40 * 2**8
    x = make_ids(30, B=1)
    with torch.no_grad():
        short, long = model(x[:, 20:])[:, -1], model(x)[:, -1]
    torch.testing.assert_close(short, long, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_heads", [0, -4, 2.5, True])
def test_bad_head_counts_are_refused_by_name(n_heads):
    with pytest.raises(ValueError, match=f"n_heads={n_heads!r} must be a positive integer"):
        alibi_slopes(n_heads)


def test_bad_lengths_are_refused_by_name(make_llama):
    with pytest.raises(ValueError, match="T=4, S=2: need 1 <= T <= S"):
        alibi_bias(4, 4, 2)
    with pytest.raises(ValueError, match="max_len=0 must be a positive integer"):
        use_alibi(make_llama(), max_len=0)
