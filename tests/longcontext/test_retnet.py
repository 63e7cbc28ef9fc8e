"""Retention: the parallel, recurrent and chunk-wise forms against a brute-force sum and against each other."""

from __future__ import annotations

import pytest
import torch

from effref.longcontext.retnet import (MultiScaleRetention, retention_chunkwise, retention_gammas,
                                       retention_parallel, retention_recurrent)


def brute_retention(q, k, v, gammas):
    """o_n = Σ_{m ≤ n} γ^(n−m) (q_n · k_m) v_m, one term at a time."""
    B, h, T, _ = q.shape
    out = torch.zeros(B, h, T, v.shape[-1], dtype=q.dtype)
    for head in range(h):
        for n in range(T):
            for m in range(n + 1):
                weight = gammas[head] ** (n - m) * (q[:, head, n] * k[:, head, m]).sum(-1)  # (B,)
                out[:, head, n] += weight[:, None] * v[:, head, m]
    return out


def qkv(T=11, h=3, d=4, d_v=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, h, T, d, generator=g, dtype=torch.float64),
            torch.randn(2, h, T, d, generator=g, dtype=torch.float64),
            torch.randn(2, h, T, d_v, generator=g, dtype=torch.float64))


def test_parallel_form_is_the_decayed_sum():
    q, k, v = qkv()
    gammas = torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)
    torch.testing.assert_close(retention_parallel(q, k, v, gammas), brute_retention(q, k, v, gammas))


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 11, 64])
def test_the_three_forms_agree(chunk_size):
    q, k, v = qkv()
    gammas = retention_gammas(3)
    parallel = retention_parallel(q, k, v, gammas)
    recurrent, state_r = retention_recurrent(q, k, v, gammas)
    chunked, state_c = retention_chunkwise(q, k, v, gammas, chunk_size)
    torch.testing.assert_close(recurrent, parallel)
    torch.testing.assert_close(chunked, parallel)
    torch.testing.assert_close(state_c, state_r)  # the same d × d_v summary of the whole past


def test_a_state_continues_the_sequence():
    q, k, v = qkv(T=12)
    gammas = retention_gammas(3)
    full = retention_parallel(q, k, v, gammas)
    head, state = retention_chunkwise(q[:, :, :7], k[:, :, :7], v[:, :, :7], gammas, 3)
    tail, _ = retention_recurrent(q[:, :, 7:], k[:, :, 7:], v[:, :, 7:], gammas, state)
    torch.testing.assert_close(torch.cat([head, tail], 2), full)


def test_retention_forgets_geometrically():
    """A key seen n steps ago weighs γ^n: its contribution to o_n is exactly the decayed dot product."""
    q, k, v = qkv(T=6, h=1, d=2, d_v=1)
    gammas = torch.tensor([0.5], dtype=torch.float64)
    v = torch.zeros_like(v)
    v[:, :, 0] = 1.0  # only the first token has a value
    out = retention_parallel(q, k, v, gammas)
    expected = torch.stack([0.5**n * (q[:, 0, n] * k[:, 0, 0]).sum(-1) for n in range(6)], -1)  # (B, T)
    torch.testing.assert_close(out[:, 0, :, 0], expected)


def test_gammas_follow_the_paper():
    torch.testing.assert_close(retention_gammas(4), torch.tensor([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128, 1 - 1 / 256],
                                                                 dtype=torch.float64))


@pytest.mark.parametrize("form, kwargs", [("recurrent", {}), ("chunkwise", {"chunk_size": 4}),
                                          ("chunkwise", {"chunk_size": 13})])
def test_module_forms_agree_and_continue_from_a_state(form, kwargs):
    torch.manual_seed(0)
    msr = MultiScaleRetention(d_model=24, n_heads=3, max_len=64).double()
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    parallel, none = msr(x)
    assert none is None
    torch.testing.assert_close(msr(x, form=form, **kwargs)[0], parallel)
    first, state = msr(x[:, :5], form=form, **kwargs)
    rest, _ = msr(x[:, 5:], form="recurrent", state=state, offset=5)
    torch.testing.assert_close(torch.cat([first, rest], 1), parallel)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"d_model": 24, "n_heads": 5}, ValueError, "n_heads=5 must be a positive divisor of d_model=24"),
    ({"d_model": 24, "n_heads": 0}, ValueError, "n_heads=0"),
    ({"d_model": 0, "n_heads": 1}, ValueError, "d_model=0 must be a positive integer"),
    ({"d_model": 9, "n_heads": 3}, ValueError, "must be even"),
])
def test_bad_module_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiScaleRetention(**kwargs)


def test_bad_call_arguments_are_refused():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="chunk_size=0 must be a positive integer"):
        retention_chunkwise(q, k, v, retention_gammas(3), 0)
    with pytest.raises(ValueError, match="one decay in"):
        retention_parallel(q, k, v, torch.tensor([0.5, 1.0, 0.9]))
    with pytest.raises(ValueError, match="one decay in"):
        retention_parallel(q, k, v, retention_gammas(2))
    with pytest.raises(ValueError, match="need q, k"):
        retention_parallel(q, k[:, :, :3], v, retention_gammas(3))
    msr = MultiScaleRetention(8, 2, max_len=8)
    with pytest.raises(ValueError, match="form='sparse'"):
        msr(torch.randn(1, 3, 8), form="sparse")
    with pytest.raises(ValueError, match="exceed max_len=8"):
        msr(torch.randn(1, 9, 8), form="recurrent")
    with pytest.raises(ValueError, match="form='parallel' starts at position 0"):
        msr(torch.randn(1, 3, 8), offset=2)
