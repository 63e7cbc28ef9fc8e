"""TS-DShapley: data Shapley values on sampled subsets, transferred from a cheap proxy to the target model.

Papers: Ghorbani & Zou (2019), "Data Shapley", arXiv:1904.02868 — Algorithm 1 (truncated Monte Carlo);
Schoch, Mishra, Ji (2023), "Data Selection for Fine-tuning Large Language Models Using Transferred
Shapley Values", arXiv:2306.10165 — §3 (sampling-based subsets, value transfer).
Implements: the Shapley value of training point i under a value function v (validation accuracy of a
model trained on a subset),

    φ_i = (1/n) Σ_{S ⊆ D∖{i}} C(n−1, |S|)⁻¹ [v(S ∪ {i}) − v(S)] = E_π [v(P_i^π ∪ {i}) − v(P_i^π)],

exactly by enumeration (tiny n) or by truncated Monte Carlo over random permutations π: the marginal
contributions along π stop being computed (are set to 0) once |v(D) − v(prefix)| < tolerance. TS-DShapley
makes this affordable for a large pool: it partitions the pool into random subsets of ``subset_size``
points, runs TMC-Shapley inside each subset, repeats over ``rounds`` fresh partitions and averages each
point's values; the value function uses a cheap classifier on features from a *proxy* model, and the
values select data for fine-tuning the target model (value transfer).
Glossary: φ = ``values`` · v = ``value_fn`` · π permutation · P_i^π points before i in π · D the whole
(sub)set · tolerance = ``truncation_tol``.
Simplified: the classifier is nearest-centroid (cosine) on given features (the paper fits logistic
regression on a small LM's embeddings); v(∅) is the accuracy of always predicting the validation set's
majority class.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch

from effref.data_selection.common import check_pool_size

ValueFn = Callable[[list[int]], float]


def _check_players(num_players: int) -> None:
    if isinstance(num_players, bool) or not isinstance(num_players, int) or num_players < 1:
        raise ValueError(f"num_players={num_players!r} must be an integer ≥ 1")


def exact_shapley(num_players: int, value_fn: ValueFn) -> torch.Tensor:
    """Shapley values by enumerating every coalition (2ⁿ calls of ``value_fn``; n ≤ 16): (n,) float64."""
    _check_players(num_players)
    if num_players > 16:
        raise ValueError(f"num_players={num_players} needs 2^{num_players} evaluations; use tmc_shapley")
    n = num_players
    value = {subset: value_fn(list(subset)) for size in range(n + 1)
             for subset in itertools.combinations(range(n), size)}
    values = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        for subset, v in value.items():
            if i not in subset:
                with_i = tuple(sorted(subset + (i,)))
                values[i] += (value[with_i] - v) / (n * math.comb(n - 1, len(subset)))
    return values


def tmc_shapley(num_players: int, value_fn: ValueFn, permutations: int, truncation_tol: float = 0.0,
                seed: int = 0) -> torch.Tensor:
    """Truncated Monte Carlo Shapley estimates over ``permutations`` seeded random orders: (n,) float64."""
    _check_players(num_players)
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise ValueError(f"permutations={permutations!r} must be an integer ≥ 1")
    if truncation_tol < 0:
        raise ValueError(f"truncation_tol={truncation_tol} must be ≥ 0 (0 = no truncation)")
    generator = torch.Generator().manual_seed(seed)
    full_value = value_fn(list(range(num_players)))
    empty_value = value_fn([])
    totals = torch.zeros(num_players, dtype=torch.float64)
    for _ in range(permutations):
        order = torch.randperm(num_players, generator=generator).tolist()
        previous = empty_value
        for position, player in enumerate(order):
            if truncation_tol > 0 and abs(full_value - previous) < truncation_tol:
                break  # the rest of this permutation contributes 0
            current = value_fn(order[:position + 1])
            totals[player] += current - previous
            previous = current
    return totals / permutations


def centroid_accuracy_value(features: torch.Tensor, labels: torch.LongTensor, val_features: torch.Tensor,
                            val_labels: torch.LongTensor) -> ValueFn:
    """v(S) = validation accuracy of the nearest-centroid (cosine) classifier fitted on points S."""
    train = torch.nn.functional.normalize(features.double(), dim=1)  # (N, F)
    val = torch.nn.functional.normalize(val_features.double(), dim=1)  # (M, F)
    majority = torch.bincount(val_labels).max().item() / len(val_labels)

    def value(subset: list[int]) -> float:
        if not subset:
            return majority
        members = torch.tensor(subset)
        classes = labels[members].unique()  # (c,)
        centroids = torch.stack([train[members[labels[members] == c]].mean(0) for c in classes])  # (c, F)
        predicted = classes[(val @ centroids.T).argmax(1)]  # (M,)
        return (predicted == val_labels).double().mean().item()

    return value


def ts_dshapley(features: torch.Tensor, labels: torch.LongTensor, val_features: torch.Tensor,
                val_labels: torch.LongTensor, subset_size: int = 20, rounds: int = 5, permutations: int = 20,
                truncation_tol: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Every training point's value: TMC-Shapley within random subsets of ``subset_size``, averaged: (N,)."""
    check_pool_size(len(features), "training set")
    if len(labels) != len(features) or len(val_labels) != len(val_features):
        raise ValueError(f"features ({len(features)}) and labels ({len(labels)}), val_features "
                         f"({len(val_features)}) and val_labels ({len(val_labels)}) must have equal lengths")
    check_pool_size(len(val_features), "validation set")
    if isinstance(subset_size, bool) or not isinstance(subset_size, int) or subset_size < 1:
        raise ValueError(f"subset_size={subset_size!r} must be an integer ≥ 1")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} must be an integer ≥ 1")
    value = centroid_accuracy_value(features, labels, val_features, val_labels)
    generator = torch.Generator().manual_seed(seed)
    sums = torch.zeros(len(features), dtype=torch.float64)
    counts = torch.zeros(len(features), dtype=torch.float64)
    for round_index in range(rounds):
        shuffled = torch.randperm(len(features), generator=generator)  # one partition per round
        for part, members in enumerate(shuffled.split(subset_size)):
            ids = members.tolist()
            local = tmc_shapley(len(ids), lambda subset, ids=ids: value([ids[j] for j in subset]),
                                permutations, truncation_tol, seed=seed + 1000 * round_index + part)
            sums[members] += local
            counts[members] += 1
    return sums / counts
