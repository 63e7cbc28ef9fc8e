"""Shapley values: exact enumeration against hand-computed games, TMC converging to them, TS-DShapley."""

from __future__ import annotations

import math

import pytest
import torch

from effref.data_selection import centroid_accuracy_value, exact_shapley, tmc_shapley, ts_dshapley

pytestmark = pytest.mark.usefixtures("one_thread")


def glove_game(subset):  # players 0, 1 own left gloves, player 2 a right glove: a pair is worth 1
    left, right = sum(p in (0, 1) for p in subset), int(2 in subset)
    return float(min(left, right))


def test_exact_shapley_on_the_glove_game_is_one_sixth_one_sixth_two_thirds():
    torch.testing.assert_close(exact_shapley(3, glove_game), torch.tensor([1 / 6, 1 / 6, 2 / 3], dtype=torch.float64))


def test_exact_shapley_of_an_additive_game_is_each_players_own_worth_and_efficient():
    worth = [0.3, -0.1, 0.5, 0.2, 0.0]
    torch.testing.assert_close(exact_shapley(5, lambda s: sum(worth[i] for i in s)),
                               torch.tensor(worth, dtype=torch.float64))
    weights = [3, 1, 2, 2, 1]  # weighted majority game: a coalition wins with weight ≥ 5
    values = exact_shapley(5, lambda s: float(sum(weights[i] for i in s) >= 5))
    assert math.isclose(values.sum().item(), 1.0)  # efficiency: Σ φ = v(N) − v(∅)
    assert values[0] > values[2] == values[3] > values[1] == values[4]  # symmetry and monotonicity


def test_tmc_without_truncation_converges_to_the_exact_values():
    weights = [3, 1, 2, 2, 1, 4]
    game = lambda s: float(sum(weights[i] for i in s) >= 7)
    exact = exact_shapley(6, game)
    estimate = tmc_shapley(6, game, permutations=3000, seed=0)
    # per-permutation marginals lie in [0, 1]: the standard error is ≤ 0.5/√3000 ≈ 0.009
    assert (estimate - exact).abs().max() < 0.04
    assert math.isclose(estimate.sum().item(), 1.0)  # every permutation's marginals telescope to v(N) − v(∅)
    coarse = tmc_shapley(6, game, permutations=20, seed=0)
    assert (coarse - exact).abs().max() > (estimate - exact).abs().max()


def test_truncation_skips_evaluations_once_the_prefix_is_worth_the_whole_set():
    calls = []

    def saturating(subset):  # any one player already gives the full value
        calls.append(len(subset))
        return float(len(subset) > 0)

    values = tmc_shapley(8, saturating, permutations=10, truncation_tol=1e-9, seed=0)
    # v(full) and v(∅), then one evaluation per permutation: its first player takes the whole value
    assert calls[:2] == [8, 0] and calls[2:] == [1] * 10
    torch.testing.assert_close(values * 10, (values * 10).round())  # each φ_i = (times first) / 10
    assert math.isclose(values.sum().item(), 1.0)


def test_ts_dshapley_ranks_flipped_labels_below_clean_ones_and_is_deterministic():
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    labels = torch.arange(60) % 2
    features = centers[labels] + torch.randn(60, 2, generator=generator)
    val_labels = torch.arange(40) % 2
    val_features = centers[val_labels] + torch.randn(40, 2, generator=generator)
    noisy = labels.clone()
    noisy[:12] = 1 - noisy[:12]  # the first 12 labels are wrong
    values = ts_dshapley(features, noisy, val_features, val_labels, subset_size=10, rounds=4, permutations=10)
    assert torch.equal(values, ts_dshapley(features, noisy, val_features, val_labels, subset_size=10, rounds=4,
                                           permutations=10))
    assert values[:12].mean() < 0 < values[12:].mean()
    # AUROC of "clean" vs value, by brute force over pairs
    auroc = (values[12:, None] > values[None, :12]).double().mean()
    assert auroc > 0.9


def test_centroid_value_of_the_empty_set_is_the_majority_rate():
    value = centroid_accuracy_value(torch.eye(2), torch.tensor([0, 1]), torch.eye(2)[[0, 0, 1]],
                                    torch.tensor([0, 0, 1]))
    assert math.isclose(value([]), 2 / 3) and value([0, 1]) == 1.0 and math.isclose(value([1]), 1 / 3)


@pytest.mark.parametrize("call, message", [
    (lambda: exact_shapley(0, glove_game), r"num_players=0 must be an integer ≥ 1"),
    (lambda: exact_shapley(17, glove_game), r"use tmc_shapley"),
    (lambda: tmc_shapley(3, glove_game, permutations=0), r"permutations=0 must be"),
    (lambda: tmc_shapley(3, glove_game, 5, truncation_tol=-1), r"truncation_tol=-1 must be ≥ 0"),
    (lambda: ts_dshapley(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), torch.zeros(1, 2),
                         torch.zeros(1, dtype=torch.long)), r"training set is empty"),
    (lambda: ts_dshapley(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), torch.zeros(1, 2),
                         torch.zeros(1, dtype=torch.long)), r"must have equal lengths"),
    (lambda: ts_dshapley(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), torch.zeros(1, 2),
                         torch.zeros(1, dtype=torch.long), subset_size=0), r"subset_size=0 must be"),
])
def test_bad_inputs_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
