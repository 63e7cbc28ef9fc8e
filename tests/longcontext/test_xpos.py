"""xPOS: scores depend on the relative position only, decay per pair as the paper's ζ^(distance/B), and an
xPOS Llama decodes with a cache as in one pass; with ζ → 1 it is RoPE."""

from __future__ import annotations

import pytest
import torch

from effref.longcontext.xpos import XPosAttention, use_xpos, xpos_decay, xpos_scale
from effref.models.llama import apply_rope, rope_tables


def xpos_qk(q, k, m, n, d=16, center=0):
    """q̃_m · k̃_n for single vectors q, k (d,) at positions m, n."""
    cos, sin = rope_tables(d, max(m, n) + 1, 10000.0)
    qm = apply_rope(q.view(1, 1, 1, d), cos[m:m + 1], sin[m:m + 1]) * xpos_scale(d, torch.tensor([m]), center=center)
    kn = apply_rope(k.view(1, 1, 1, d), cos[n:n + 1], sin[n:n + 1]) / xpos_scale(d, torch.tensor([n]), center=center)
    return (qm * kn).sum().double()


@pytest.mark.parametrize("m, n, shift", [(10, 3, 100), (700, 1, 2000), (5, 5, 4321), (300, 299, 17)])
def test_score_depends_only_on_the_relative_position(m, n, shift):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)
    a, b = xpos_qk(q, k, m, n), xpos_qk(q, k, m + shift, n + shift)
    assert abs(a - b) < 1e-4 * (1 + abs(a))
    assert abs(xpos_qk(q, k, m, n, center=1000) - a) < 1e-4 * (1 + abs(a))  # the center cancels too


def test_each_pair_decays_as_zeta_to_the_distance_over_the_scale_base():
    # q and k on pair 0 only: RoPE's score of pair 0 times ζ_0^((m − n)/512)
    d, m, n = 16, 900, 100
    q, k = torch.zeros(d), torch.zeros(d)
    q[0] = k[0] = 1.0
    cos, sin = rope_tables(d, m + 1, 10000.0)
    rope_score = (apply_rope(q.view(1, 1, 1, d), cos[m:m + 1], sin[m:m + 1]) *
                  apply_rope(k.view(1, 1, 1, d), cos[n:n + 1], sin[n:n + 1])).sum()
    zeta0 = 0.4 / 1.4  # (2·0/d + γ) / (1 + γ)
    torch.testing.assert_close(xpos_qk(q, k, m, n).float(), rope_score * zeta0 ** ((m - n) / 512), rtol=1e-4, atol=0)
    zeta = xpos_decay(d)
    assert zeta[0] == zeta[d // 2] and (zeta[1:d // 2] > zeta[:d // 2 - 1]).all() and zeta.max() < 1


def test_xpos_llama_decodes_with_a_cache_as_it_computes_in_one_pass(make_llama, make_ids):
    model = use_xpos(make_llama(), scale_base=16.0).double()  # float64: the weights are large
    assert all(isinstance(b.attn, XPosAttention) for b in model.blocks)
    x = make_ids(60)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 60)
        steps = [model(x[:, :40], cache)] + [model(x[:, t:t + 1], cache) for t in range(40, 60)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-9, atol=1e-9)


def test_without_decay_xpos_is_rope(make_llama, make_ids):
    plain = make_llama()
    x = make_ids(50)
    with torch.no_grad():
        expected = plain(x)
        got = use_xpos(plain, gamma=1e9)(x)  # ζ_i → 1 for every pair
        changed = use_xpos(make_llama(), scale_base=8.0)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (changed - expected).abs().max() > 1e-2


@pytest.mark.parametrize("call, message", [
    (lambda: xpos_decay(7), "d_head=7 must be an even positive integer"),
    (lambda: xpos_decay(8, gamma=0.0), "gamma=0.0 must be positive"),
    (lambda: xpos_scale(8, torch.arange(3), scale_base=0), "scale_base=0 must be positive"),
])
def test_bad_arguments_are_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()
