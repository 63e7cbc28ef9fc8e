"""Sparse patterns against masks built by a slow loop over (i, j) from the papers' set definitions, and the
sparse attentions against PyTorch's SDPA under those masks; Reformer against a mask built from its buckets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from effref.attention import (
    bigbird_attention,
    fixed_pattern,
    longformer_attention,
    lsh_buckets,
    random_keys,
    reformer_attention,
    sparse_attention,
    sparse_transformer_attention,
    strided_pattern,
    window_global_pattern,
)


def loop_mask(T, allowed, causal):
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            mask[i, j] = allowed(i, j) and (j <= i or not causal)
    return mask


def qkv(T, H=2, H_kv=2, D=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, H, T, D, generator=gen), torch.randn(2, H_kv, T, D, generator=gen),
            torch.randn(2, H_kv, T, D, generator=gen))


def masked_sdpa(q, k, v, mask):
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          attn_mask=mask)


CASES = [(T, l, causal) for T in (13, 32, 45) for l in (3, 4, 8) for causal in (False, True)]


@pytest.mark.parametrize("T, l, causal", CASES)
def test_strided_pattern_equals_loop(T, l, causal):
    expected = loop_mask(T, lambda i, j: abs(i - j) < l or (i - j) % l == 0, causal)
    assert torch.equal(strided_pattern(T, l, causal).mask(causal), expected)


@pytest.mark.parametrize("T, l, causal", CASES)
def test_fixed_pattern_equals_loop(T, l, causal):
    c = 2 if l > 2 else 1
    expected = loop_mask(T, lambda i, j: i // l == j // l or j % l >= l - c, causal)
    assert torch.equal(fixed_pattern(T, l, c, causal).mask(causal), expected)


@pytest.mark.parametrize("T, w, g, causal", [(13, 1, 0, False), (32, 3, 2, False), (45, 4, 3, True),
                                             (20, 25, 1, True)])
def test_longformer_pattern_equals_loop(T, w, g, causal):
    expected = loop_mask(T, lambda i, j: abs(i - j) <= w or j < g or i < g, causal)
    assert torch.equal(window_global_pattern(T, w, g, causal).mask(causal), expected)


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_pattern_equals_loop_with_the_same_random_keys(causal):
    T, w, g, r = 41, 2, 2, 3
    random = random_keys(T, r, causal, torch.Generator().manual_seed(5))  # (T, r)
    drawn = [set(row.tolist()) for row in random]
    expected = loop_mask(T, lambda i, j: abs(i - j) <= w or j < g or i < g or j in drawn[i], causal)
    pattern = window_global_pattern(T, w, g, causal, random)
    assert torch.equal(pattern.mask(causal), expected)
    rows = torch.arange(T)[:, None].expand_as(pattern.index)
    pairs = list(zip(rows[pattern.valid].tolist(), pattern.index[pattern.valid].tolist()))
    assert len(pairs) == len(set(pairs))  # no key counted twice in one softmax


def test_random_keys_respect_causality():
    keys = random_keys(50, 7, True, torch.Generator().manual_seed(0))
    assert bool((keys <= torch.arange(50)[:, None]).all()) and bool((keys >= 0).all())
    assert len(keys.unique()) > 25  # and are spread out, not all 0


@pytest.mark.parametrize("causal", [False, True])
def test_sparse_attentions_equal_sdpa_under_their_masks(causal):
    T = 45
    q, k, v = qkv(T, H=4, H_kv=2)
    strided = sparse_transformer_attention(q, k, v, causal=causal, stride=5)
    torch.testing.assert_close(strided, masked_sdpa(q, k, v, strided_pattern(T, 5, causal).mask(causal)))
    fixed = sparse_transformer_attention(q, k, v, causal=causal, stride=5, mode="fixed", summary=2)
    torch.testing.assert_close(fixed, masked_sdpa(q, k, v, fixed_pattern(T, 5, 2, causal).mask(causal)))
    longformer = longformer_attention(q, k, v, causal=causal, window=3, n_global=2)
    torch.testing.assert_close(longformer,
                               masked_sdpa(q, k, v, window_global_pattern(T, 3, 2, causal).mask(causal)))
    bigbird = bigbird_attention(q, k, v, causal=causal, window=3, n_global=2, n_random=4, seed=7)
    random = random_keys(T, 4, causal, torch.Generator().manual_seed(7))
    torch.testing.assert_close(bigbird,
                               masked_sdpa(q, k, v, window_global_pattern(T, 3, 2, causal, random).mask(causal)))


def test_lsh_buckets_put_nearby_directions_together():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 200, 16, generator=gen)
    near = x + 0.05 * torch.randn(x.shape, generator=gen)
    buckets = lsh_buckets(torch.cat([x, near, torch.randn(x.shape, generator=gen)], dim=2), 8,
                          torch.Generator().manual_seed(1))[0, 0]  # (600,)
    same_near = (buckets[:200] == buckets[200:400]).float().mean().item()
    same_random = (buckets[:200] == buckets[400:]).float().mean().item()
    assert same_near > 0.8 and same_random < 0.3  # random pairs share one of 8 buckets ≈ 1/8 of the time


@pytest.mark.parametrize("causal", [False, True])
def test_reformer_equals_a_loop_over_its_sorted_chunks(causal):
    T, c, b, D = 29, 4, 4, 8
    gen = torch.Generator().manual_seed(3)
    q, v = torch.randn(1, 1, T, D, generator=gen), torch.randn(1, 1, T, D, generator=gen)
    buckets = lsh_buckets(q, b, torch.Generator().manual_seed(0))[0, 0]  # the draw reformer_attention makes
    order = sorted(range(T), key=lambda i: (buckets[i].item(), i))
    slot = {pos: s for s, pos in enumerate(order)}
    allowed = loop_mask(T, lambda i, j: 0 <= slot[i] // c - slot[j] // c <= 1, causal)
    keys = F.normalize(q, dim=-1)
    scores = (q @ keys.transpose(-1, -2) / math.sqrt(D)) - 1e5 * torch.eye(T)
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v
    torch.testing.assert_close(reformer_attention(q, None, v, causal=causal, n_buckets=b, chunk_size=c, seed=0),
                               expected)


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_gather_and_dense_mask_give_the_same_result(causal):
    T = 45
    q, k, v = qkv(T, H=4, H_kv=2)
    pattern = window_global_pattern(T, 3, 2, causal, random_keys(T, 4, causal, torch.Generator().manual_seed(1)))
    one_chunk = sparse_attention(q, k, v, pattern, causal=causal)
    torch.testing.assert_close(sparse_attention(q, k, v, pattern, causal=causal, query_chunk=7), one_chunk)
    torch.testing.assert_close(sparse_attention(q, k, v, pattern, causal=causal, dense_mask=True), one_chunk)
    torch.testing.assert_close(bigbird_attention(q, k, v, causal=causal, window=2, n_random=3, dense_mask=True),
                               bigbird_attention(q, k, v, causal=causal, window=2, n_random=3))
