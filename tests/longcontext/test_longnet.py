"""LongNet's dilated attention: the masks against their definition, the gathered computation against dense
masked attention, and the mixture against the denominators it is defined by."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from effref.longcontext.longnet import dilated_attention, dilated_mask


def masked_attention_with_lse(q, k, v, mask):
    """Dense softmax attention of every head under its own (T, T) mask; rows without keys: 0 and −inf."""
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).nan_to_num(0.0) @ v, scores.logsumexp(-1)


def brute_dilated(q, k, v, segments, dilations, causal=True):
    H, T = q.shape[1], q.shape[2]
    outs, lses = [], []
    for w, r in zip(segments, dilations):
        mask = torch.stack([dilated_mask(T, w, r, offset=h % r, causal=causal) for h in range(H)])  # (H, T, T)
        out, lse = masked_attention_with_lse(q, k, v, mask)
        outs.append(out)
        lses.append(lse)
    s = torch.stack(lses).exp()  # (K, B, H, T) the softmax denominators
    alpha = (s / s.sum(0)).nan_to_num(0.0)
    return (alpha[..., None] * torch.stack(outs)).sum(0)


def test_mask_follows_the_definition():
    T, w, r, s = 13, 6, 2, 1
    mask = dilated_mask(T, w, r, offset=s, causal=False)
    for i in range(T):
        for j in range(T):
            kept = i % w in range(s, w, r) and j % w in range(s, w, r)
            assert bool(mask[i, j]) == (kept and i // w == j // w)
    assert torch.equal(dilated_mask(T, w, r, offset=s), mask.tril())


def test_each_pattern_costs_n_w_over_r_squared():
    T, w, r = 64, 16, 4
    m = w // r  # rows kept per segment
    assert int(dilated_mask(T, w, r, causal=False).sum()) == (T // w) * m * m == T * w // r**2


@pytest.mark.parametrize("T, segments, dilations, causal", [
    (16, (4,), (1,), True), (17, (8,), (2,), True), (20, (4, 8, 16), (1, 2, 4), True),
    (23, (6, 9), (2, 3), False), (9, (32,), (1,), True), (30, (5, 10, 30), (1, 3, 5), True)])
def test_dilated_attention_equals_dense_masked_attention(T, segments, dilations, causal):
    g = torch.Generator().manual_seed(T)
    q, k, v = torch.randn(3, 2, 5, T, 8, generator=g, dtype=torch.float64).unbind()
    torch.testing.assert_close(dilated_attention(q, k, v, segments, dilations, causal),
                               brute_dilated(q, k, v, segments, dilations, causal))


def test_one_dense_segment_is_causal_attention():
    q, k, v = torch.randn(3, 2, 4, 10, 8).unbind()
    torch.testing.assert_close(dilated_attention(q, k, v, (10,), (1,)),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("segments, dilations, match", [
    ((4, 8), (1,), "equal length"), ((), (), "non-empty"), ((4,), (0,), "need integers 1 <= r <= w"),
    ((0,), (1,), "w=0"), ((2,), (4,), "r=4"), ((4.0,), (1,), "w=4.0")])
def test_bad_patterns_are_refused(segments, dilations, match):
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match=match):
        dilated_attention(q, q, q, segments, dilations)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"must all be \(B, H, T, d\)"):
        dilated_attention(torch.randn(1, 2, 8, 4), torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4), (4,), (1,))
