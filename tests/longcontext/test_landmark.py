"""Landmark attention: the grouped softmax against a per-query loop, and exactly softmax attention when the
landmark scores are the blocks' log-sum-exps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from effref.longcontext.landmark import block_mean_keys, grouped_softmax_weights, landmark_attention


def qkv(T=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 2, 3, T, 8, generator=g, dtype=torch.float64).unbind()


def brute_landmark(q, k, v, landmarks, block_size, top_k):
    """One query at a time: top-level softmax over own-block tokens and the chosen earlier landmarks."""
    B, H, T, d = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                bi = i // block_size
                own = list(range(bi * block_size, i + 1))
                g = [float(q[b, h, i] @ landmarks[b, h, blk]) / math.sqrt(d) for blk in range(bi)]
                chosen = sorted(range(bi), key=lambda blk: -g[blk])[:top_k or bi]
                logits = [float(q[b, h, i] @ k[b, h, j]) / math.sqrt(d) for j in own] + [g[c] for c in chosen]
                top = torch.tensor(logits).softmax(0)
                for n, j in enumerate(own):
                    out[b, h, i] += top[n] * v[b, h, j]
                for n, blk in enumerate(chosen):
                    keys = range(blk * block_size, (blk + 1) * block_size)
                    inner = torch.tensor([float(q[b, h, i] @ k[b, h, j]) / math.sqrt(d) for j in keys]).softmax(0)
                    for m, j in enumerate(keys):
                        out[b, h, i] += top[len(own) + n] * inner[m] * v[b, h, j]
    return out


@pytest.mark.parametrize("block_size, top_k", [(3, None), (3, 2), (4, 1), (5, None), (2, 3)])
def test_landmark_attention_equals_the_per_query_loop(block_size, top_k):
    q, k, v = qkv()
    landmarks = block_mean_keys(k, block_size) + 0.3 * torch.randn_like(block_mean_keys(k, block_size))
    torch.testing.assert_close(landmark_attention(q, k, v, block_size, top_k, landmarks),
                               brute_landmark(q, k, v, landmarks, block_size, top_k))


@pytest.mark.parametrize("T, block_size", [(13, 3), (16, 4), (9, 1)])
def test_log_sum_exp_landmarks_make_it_exact_softmax_attention(T, block_size):
    q, k, v = qkv(T)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    n_blocks = math.ceil(T / block_size)
    pad = F.pad(scores, (0, n_blocks * block_size - T), value=float("-inf"))
    oracle = pad.view(*scores.shape[:3], n_blocks, block_size).logsumexp(-1)  # g_ib = log Σ_{j∈b} e^{s_ij}
    weights = grouped_softmax_weights(scores, oracle, block_size)
    torch.testing.assert_close(weights @ v, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_weights_are_causal_distributions_and_one_block_is_plain_attention():
    q, k, v = qkv()
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    weights = grouped_softmax_weights(scores, torch.randn(2, 3, 13, 5, dtype=torch.float64), 3, top_k=2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 13, dtype=torch.float64))
    assert (weights.triu(1) == 0).all()
    torch.testing.assert_close(landmark_attention(q, k, v, 13), F.scaled_dot_product_attention(q, k, v,
                                                                                             is_causal=True))


def test_block_mean_keys_average_each_block_including_a_short_last_one():
    k = torch.arange(7.0)[None, None, :, None]  # (1, 1, 7, 1)
    assert block_mean_keys(k, 3)[0, 0, :, 0].tolist() == [1.0, 4.0, 6.0]


def test_bad_inputs_are_refused():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="block_size=0 must be a positive integer"):
        landmark_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="top_k=0 must be a positive integer"):
        landmark_attention(q, k, v, 3, top_k=0)
    with pytest.raises(ValueError, match="landmarks must be"):
        landmark_attention(q, k, v, 3, landmarks=torch.zeros(2, 3, 4, 8))
    with pytest.raises(ValueError, match="block_scores must be"):
        grouped_softmax_weights(q @ k.transpose(-1, -2), torch.zeros(2, 3, 13, 4), 3)
    with pytest.raises(ValueError, match=r"must all be \(B, H, T, d\)"):
        landmark_attention(q, k[:, :1], v, 3)
