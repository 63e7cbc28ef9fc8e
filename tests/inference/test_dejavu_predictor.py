"""Deja Vu's shared predictor and top-k selection: recall and mass fraction by brute force, a planted
low-rank importance recovered by the closed-form predictor, bad input."""

from __future__ import annotations

import pytest
import torch

from effref.inference.dejavu_predictor import (
    DejaVuConfig,
    keep_count,
    mass_fraction,
    recall,
    top_k_mask,
    train_predictor,
)


def test_recall_matches_brute_force_set_intersection():
    g = torch.Generator().manual_seed(3)
    pred, true = torch.randn(20, 30, generator=g), torch.randn(20, 30, generator=g)
    for k in (1, 5, 30):
        brute = sum(len(set(p.topk(k).indices.tolist()) & set(t.topk(k).indices.tolist())) / k
                    for p, t in zip(pred, true)) / 20
        assert recall(pred, true, k) == pytest.approx(brute)
    assert recall(true, true, 7) == 1.0


def test_mass_fraction_matches_brute_force():
    c = torch.tensor([[5.0, 3.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # row 0: 5/10 < 0.75, 8/10 ≥ 0.75 → 2 of 4 neurons; row 1: 3 of 4 reach 0.75
    torch.testing.assert_close(mass_fraction(c, 0.75), torch.tensor([0.5, 0.75]))


def test_predictor_recovers_a_planted_low_rank_importance():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(16, 4, generator=g) @ torch.randn(4, 64, generator=g)  # rank 4
    x_train, x_test = torch.randn(512, 16, generator=g), torch.randn(256, 16, generator=g)
    importance = lambda x: (x @ M + 30) ** 2
    predictor = train_predictor(x_train, importance(x_train), DejaVuConfig(rank=5, ridge=1e-6))
    assert recall(predictor(x_test), importance(x_test), 16) > 0.95


@pytest.mark.parametrize("make, message", [
    (lambda: DejaVuConfig(rank=0), "rank=0"),
    (lambda: DejaVuConfig(ridge=-1.0), "ridge=-1.0"),
    (lambda: train_predictor(torch.randn(8, 4), torch.rand(8, 48), DejaVuConfig(rank=6)), "rank=6 exceeds"),
    (lambda: keep_count(1.5, 10), "keep=1.5"),
    (lambda: top_k_mask(torch.randn(3, 5), 6), "k=6"),
    (lambda: recall(torch.randn(3, 5), torch.randn(3, 4), 2), "differ in shape"),
    (lambda: mass_fraction(torch.rand(3, 5), 0.0), "mass=0.0"),
    (lambda: train_predictor(torch.randn(4, 16), torch.randn(5, 48), DejaVuConfig()), "must be"),
    (lambda: train_predictor(torch.randn(40, 16), torch.rand(40, 9), DejaVuConfig(rank=10)), "rank=10 exceeds"),
])
def test_bad_input_is_reported(make, message):
    with pytest.raises(ValueError, match=message):
        make()
