"""Sliding-window attention against a brute-force band, a one-layer model against the plain model on the window,
and the rolling cache against the full pass."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from effref.inference.kv_eval import decode_nll
from effref.inference.kv_policies import StreamingCache
from effref.longcontext.positions import PositionalAttention, swap_attention
from effref.longcontext.sliding_window import (SlidingWindowCache, sliding_window_attention, sliding_window_mask,
                                               use_sliding_window)


def brute_band_attention(q, k, v, window):
    """Loop over every query: softmax over the keys at distance 0 .. window − 1 behind it."""
    _, H, T, d = q.shape
    S, groups = k.shape[2], H // k.shape[1]
    out = torch.zeros_like(q)
    for h in range(H):
        for t in range(T):
            i = S - T + t
            keys = range(max(0, i - window + 1), i + 1)
            scores = torch.stack([(q[:, h, t] * k[:, h // groups, j]).sum(-1) for j in keys], -1) / math.sqrt(d)
            weights = scores.softmax(-1)  # (B, n)
            out[:, h, t] = sum(weights[:, n, None] * v[:, h // groups, j] for n, j in enumerate(keys))
    return out


@pytest.mark.parametrize("T, S, window", [(7, 7, 3), (5, 9, 4), (1, 6, 2), (6, 6, 1), (6, 6, 10)])
def test_band_attention_equals_brute_force(T, S, window):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, T, 8, generator=g)
    k, v = torch.randn(2, 2, S, 8, generator=g), torch.randn(2, 2, S, 8, generator=g)
    torch.testing.assert_close(sliding_window_attention(q, k, v, window), brute_band_attention(q, k, v, window))


def test_mask_is_the_band_and_a_wide_window_is_causal_attention():
    mask = sliding_window_mask(5, 5, 2)
    assert mask.tolist() == [[i - 2 < j <= i for j in range(5)] for i in range(5)]
    q, k, v = torch.randn(3, 1, 2, 6, 4).unbind()
    torch.testing.assert_close(sliding_window_attention(q, k, v, 6), F.scaled_dot_product_attention(q, k, v,
                                                                                                 is_causal=True))


def test_one_layer_model_at_position_t_equals_the_plain_model_on_its_window(make_llama, make_ids):
    """RoPE is relative: one SWA layer at position t sees exactly the plain model run on tokens t−W+1..t."""
    window, x = 5, make_ids(20)
    plain = make_llama(n_layers=1)
    swa = use_sliding_window(make_llama(n_layers=1), window)
    with torch.no_grad():
        logits = swa(x)
        for t in (window - 1, 11, 19):
            torch.testing.assert_close(logits[:, t], plain(x[:, t - window + 1:t + 1])[:, -1], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(logits[:, 19], plain(x)[:, 19], atol=1e-3)  # the window did cut something


@pytest.mark.parametrize("chunks", [[1] * 30, [7, 1, 1, 9, 12], [30], [3, 3, 20, 4]])
def test_rolling_cache_generation_equals_the_full_pass(make_llama, make_ids, chunks):
    window, x = 6, make_ids(30)
    model = use_sliding_window(make_llama(), window)
    cache = SlidingWindowCache.for_model(model, batch_size=2)
    with torch.no_grad():
        full = model(x)
        parts, start = [], 0
        for n in chunks:
            parts.append(model(x[:, start:start + n], cache))
            start += n
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)
    assert cache.k[0].shape[2] == window and cache.length == 30  # W slots, however long the stream


def test_plain_llama_decoding_one_token_at_a_time_through_the_cache_is_windowed(make_llama, make_ids):
    """The stock attention lets a single new token see all returned keys: the cache alone makes it windowed."""
    window, x = 4, make_ids(16)
    swa = use_sliding_window(make_llama(), window)
    stock = make_llama()
    cache = SlidingWindowCache.for_model(stock, batch_size=2, window=window)
    with torch.no_grad():
        stepped = torch.cat([stock(x[:, t:t + 1], cache) for t in range(16)], dim=1)
        torch.testing.assert_close(stepped, swa(x), rtol=1e-4, atol=1e-4)


def test_sinks_keep_the_first_positions_visible():
    mask = sliding_window_mask(6, 6, 2, sinks=2)
    assert mask.tolist() == [[j <= i and (i - j < 2 or j < 2) for j in range(6)] for i in range(6)]
    assert torch.equal(sliding_window_mask(6, 6, 2, sinks=0), sliding_window_mask(6, 6, 2))


@pytest.mark.parametrize("sinks", [0, 4])
def test_a_masked_pass_scores_a_stream_as_streamingllm_decoding_does(make_llama, make_ids, sinks):
    """StreamingCache with a budget of B keys = the mask with ``sinks`` s and a window of B − s + 1."""
    budget, x = 8, make_ids(30)
    model = make_llama()
    with torch.no_grad():
        decoded = decode_nll(model, x, StreamingCache.for_model(model, 2, budget=budget, sinks=sinks),
                             prefill=budget, progress=False)
        use_sliding_window(model, budget - sinks + 1, sinks=sinks)
        logp = model(x).float().log_softmax(-1)
        swap_attention(model, PositionalAttention)  # and back to the plain model
        plain = model(x).float().log_softmax(-1)
    torch.testing.assert_close(-logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0], decoded, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, logp, atol=1e-3)


@pytest.mark.parametrize("window", [0, -3, 2.5, True])
def test_bad_window_is_refused(window, make_llama):
    with pytest.raises(ValueError, match=f"window={window!r} must be a positive integer"):
        sliding_window_mask(4, 4, window)
    with pytest.raises(ValueError, match="must be a positive integer"):
        use_sliding_window(make_llama(), window)
    with pytest.raises(ValueError, match="must be a positive integer"):
        SlidingWindowCache(1, 1, 1, 8, window)


def test_bad_shapes_and_caches_are_refused(make_llama):
    q, k = torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="n_heads=3 is not divisible by n_kv_heads=2"):
        sliding_window_attention(q, k, k, 2)
    with pytest.raises(ValueError, match="with T <= S"):
        sliding_window_attention(torch.randn(1, 2, 5, 8), k, k, 2)
    with pytest.raises(ValueError, match="pass window= explicitly"):
        SlidingWindowCache.for_model(make_llama())
    with pytest.raises(ValueError, match="sinks=-1 must be an integer >= 0"):
        sliding_window_mask(4, 4, 2, sinks=-1)
    with pytest.raises(ValueError, match="keeps attention sinks"):
        SlidingWindowCache.for_model(use_sliding_window(make_llama(), 4, sinks=2))
    with pytest.raises(NotImplementedError, match="cannot roll back"):
        SlidingWindowCache(1, 1, 1, 8, 4).truncate(0)
