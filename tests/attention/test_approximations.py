"""Approximate methods converge to softmax attention as their budget grows; Linear Transformer's forms agree.

Each trend is checked over several budgets with fixed seeds: the error must fall step by step (or, where a
random draw makes single steps noisy, fall below a third of the first one). Scores are kept moderate
(q, k entries ~ N(0, ¼)), the regime in which these estimators are meant to work.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from effref.attention import (
    elu_feature_map,
    iterative_pinv,
    linear_attention,
    linear_attention_recurrent,
    linformer_attention,
    linformer_projection,
    nystrom_attention,
    orthogonal_gaussian,
    performer_attention,
    reformer_attention,
    shared_qk_attention,
)


def rel_err(approx, exact):
    return ((approx - exact).norm() / exact.norm()).item()


def moderate_qkv(B=1, H=2, T=64, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=gen) for _ in range(3))
    return 0.5 * q, 0.5 * k, v


def strictly_falling(errors):
    return all(b < a for a, b in itertools.pairwise(errors))


def test_nystrom_error_falls_as_landmarks_grow():
    q, k, v = moderate_qkv()
    exact = F.scaled_dot_product_attention(q, k, v)
    errors = [rel_err(nystrom_attention(q, k, v, landmarks=m), exact) for m in (4, 16, 32, 64)]
    assert strictly_falling(errors) and errors[-1] < errors[0] / 3, errors


def test_iterative_pinv_converges_to_the_moore_penrose_inverse():
    a = torch.softmax(torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0)), dim=-1).double()
    errors = [(iterative_pinv(a, n) - torch.linalg.pinv(a)).abs().max().item() for n in (2, 6, 12, 30)]
    assert strictly_falling(errors[:3]) and errors[-1] < 1e-8, errors


def test_linformer_with_mean_projections_converges_and_is_exact_at_full_rank():
    q, k, v = moderate_qkv()
    exact = F.scaled_dot_product_attention(q, k, v)
    errors = [rel_err(linformer_attention(q, k, v, proj_k=linformer_projection(64, r, "mean")), exact)
              for r in (4, 16, 32, 64)]
    assert strictly_falling(errors) and errors[-1] < 1e-5, errors


def test_linformer_shorter_input_uses_the_first_columns():
    q, k, v = moderate_qkv(T=40)
    proj = linformer_projection(64, 8, "random", torch.Generator().manual_seed(0))
    padded = [F.pad(t, (0, 0, 0, 24)) for t in (k, v)]  # zero-pad the keys/values to n = 64
    expected = torch.softmax(q @ (proj @ padded[0]).transpose(-1, -2) / 4, dim=-1) @ (proj @ padded[1])
    torch.testing.assert_close(linformer_attention(q, k, v, proj_k=proj), expected)


@pytest.mark.parametrize("causal", [False, True])
def test_performer_error_falls_as_features_grow(causal):
    q, k, v = moderate_qkv()
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    budgets = (16, 64, 256, 1024, 4096)
    errors = [sum(rel_err(performer_attention(q, k, v, causal=causal, features=m, seed=s), exact)
                  for s in range(3)) / 3 for m in budgets]  # mean over 3 draws of Ω
    assert strictly_falling(errors) and errors[-1] < errors[0] / 5, errors


def test_favor_features_estimate_the_softmax_kernel_without_bias():
    gen = torch.Generator().manual_seed(0)
    x, y = 0.25 * torch.randn(500, 16, generator=gen).double(), 0.25 * torch.randn(500, 16, generator=gen).double()
    omega = orthogonal_gaussian(65536, 16, gen).double()  # (m, D)
    phi = [torch.exp(z @ omega.T - (z * z).sum(-1, keepdim=True) / 2) for z in (x, y)]  # unnormalised features
    estimate = (phi[0] * phi[1]).mean(dim=-1)  # (500,)  φ(x)ᵀφ(y) with the 1/√m factors
    ratio = estimate / torch.exp((x * y).sum(-1))
    assert abs(ratio.mean().item() - 1) < 0.005  # unbiased: the mean over 500 pairs is within 0.5 %
    assert ratio.std().item() < 0.02  # and each pair within a few % at m = 65,536 (≈ 1/√m scale)


def test_orthogonal_gaussian_blocks_are_orthogonal():
    omega = orthogonal_gaussian(48, 16, torch.Generator().manual_seed(0))
    for block in omega.split(16):
        gram = block @ block.T
        torch.testing.assert_close(gram - torch.diag(torch.diagonal(gram)), torch.zeros(16, 16), atol=1e-4, rtol=0)


def test_linear_attention_prefix_sum_recurrent_and_quadratic_forms_agree():
    q, k, v = moderate_qkv(T=23)
    k, v = k[:, :1], v[:, :1]  # GQA: one key/value head for two query heads
    phi_q, phi_k = elu_feature_map(q), elu_feature_map(k.expand_as(q))  # (B, H, T, D)
    weights = (phi_q @ phi_k.transpose(-1, -2)).tril()  # (B, H, T, T)  φ(q_i)·φ(k_j), j ≤ i
    quadratic = weights / weights.sum(-1, keepdim=True) @ v.expand_as(q)
    torch.testing.assert_close(linear_attention(q, k, v, causal=True), quadratic, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(linear_attention_recurrent(q, k, v), quadratic, atol=1e-5, rtol=1e-5)
    full = (phi_q @ phi_k.transpose(-1, -2))
    torch.testing.assert_close(linear_attention(q, k, v), full / full.sum(-1, keepdim=True) @ v.expand_as(q),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_reformer_error_falls_as_chunks_grow_and_is_exact_with_one_chunk(causal):
    q, _, v = moderate_qkv(T=64)
    exact = shared_qk_attention(q, v, causal=causal)
    errors = [rel_err(reformer_attention(q, None, v, causal=causal, chunk_size=c), exact) for c in (4, 8, 16, 32)]
    assert strictly_falling(errors), errors
    torch.testing.assert_close(reformer_attention(q, q, v, causal=causal, chunk_size=64), exact)
