"""KATE, Vote-k and the orderings against brute force on tiny pools."""

import itertools
import math

import pytest
import torch

from effref.prompting import (
    kate,
    label_entropies,
    order_by_distance,
    order_by_entropy,
    random_demonstrations,
    vote_k,
)


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_kate_equals_brute_force_nearest_neighbours():
    g = torch.Generator().manual_seed(0)
    pool, queries = torch.randn(30, 8, generator=g), torch.randn(5, 8, generator=g)
    got = kate(queries, pool, k=4)
    for q in range(5):
        sims = [_cos(queries[q], pool[i]) for i in range(30)]
        brute = sorted(range(30), key=lambda i: -sims[i])[:4]
        assert got[q].tolist() == brute


def test_kate_breaks_ties_to_the_lower_index():
    pool = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 0.0]])
    assert kate(torch.tensor([[3.0, 0.0]]), pool, k=3)[0].tolist() == [0, 2, 3]


def _vote_k_brute(emb, budget, k, rho):
    """Algorithm 1 of Su et al. written out with Python loops over the vertices."""
    n = len(emb)
    neighbours = {v: sorted((u for u in range(n) if u != v), key=lambda u: -_cos(emb[v], emb[u]))[:k]
                  for v in range(n)}
    selected = []
    for _ in range(budget):
        def score(u):
            total = 0.0
            for v in range(n):
                if v not in selected and u in neighbours[v]:
                    total += rho ** -sum(1 for l in selected if l in neighbours[v])
            return total
        selected.append(max((u for u in range(n) if u not in selected), key=lambda u: (score(u), -u)))
    return selected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vote_k_equals_brute_force_on_a_small_pool(seed):
    emb = torch.randn(14, 5, generator=torch.Generator().manual_seed(seed))
    assert vote_k(emb, budget=5, k=3, rho=10.0) == _vote_k_brute(emb, 5, 3, 10.0)


def test_vote_k_spreads_over_clusters_where_the_densest_point_alone_would_not():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    emb = torch.cat([centres[c] + 0.3 * torch.randn(8, 3, generator=g) for c in range(3)])  # 3 clusters of 8
    clusters = {i // 8 for i in vote_k(emb, budget=3, k=4)}
    assert clusters == {0, 1, 2}


def test_vote_k_second_stage_takes_one_example_per_confidence_bucket():
    emb = torch.randn(40, 6, generator=torch.Generator().manual_seed(3))
    confidence = torch.arange(40.0)  # bucket b holds the examples of the b-th lowest confidence range
    chosen = vote_k(emb, budget=10, k=5, confidence=confidence)
    assert len(chosen) == len(set(chosen)) == 10
    rest = [i for i in range(40) if i != chosen[0]]
    buckets = [set(rest[b * 39 // 9:(b + 1) * 39 // 9]) for b in range(9)]
    assert all(chosen[1 + b] in buckets[b] for b in range(9))


def test_random_demonstrations_are_deterministic_for_a_seed():
    assert random_demonstrations(50, 5, seed=3) == random_demonstrations(50, 5, seed=3)
    assert random_demonstrations(50, 5, seed=3) != random_demonstrations(50, 5, seed=4)
    assert len(set(random_demonstrations(50, 50, seed=0))) == 50


def test_distance_order_puts_the_most_similar_last_or_first():
    demos = torch.tensor([[0.0, 1.0], [1.0, 0.1], [1.0, 1.0]])
    query = torch.tensor([1.0, 0.0])
    assert order_by_distance(query, demos) == [0, 2, 1]
    assert order_by_distance(query, demos, most_similar_last=False) == [1, 2, 0]


def test_label_entropies_on_known_distributions():
    balanced = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    global_e, local_e = label_entropies(balanced)
    assert global_e == pytest.approx(math.log(2))
    expected_local = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1) + 0.2 * math.log(0.2) + 0.8 * math.log(0.8)) / 2
    assert local_e == pytest.approx(expected_local)
    assert label_entropies(torch.tensor([[0.9, 0.1], [0.6, 0.4]]))[0] == pytest.approx(0.0)


def test_entropy_probing_picks_the_order_whose_predictions_are_balanced():
    good = (2, 0, 1)

    def probe(order):  # every order predicts label 0 for all probes, except `good`, which splits them
        if tuple(order) == good:
            return torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
        return torch.tensor([[0.9, 0.1]] * 4)

    best, scores = order_by_entropy(3, probe, max_orders=6)
    assert tuple(best) == good and len(scores) == 6
    assert sorted(s[0] for s in scores) == list(itertools.permutations(range(3)))
    _, scores = order_by_entropy(5, probe, max_orders=7, seed=1)
    assert len({s[0] for s in scores}) == 7
    assert order_by_entropy(5, probe, max_orders=7, seed=1)[1] == scores  # deterministic for a seed


@pytest.mark.parametrize("call, message", [
    (lambda: kate(torch.zeros(1, 3), torch.zeros(0, 3), 1), "non-empty"),
    (lambda: kate(torch.zeros(1, 3), torch.ones(4, 3), 5), "k=5 must be between 1 and the pool size 4"),
    (lambda: kate(torch.zeros(1, 2), torch.ones(4, 3), 2), "like the pool"),
    (lambda: vote_k(torch.ones(4, 3), 5), "k=5"),
    (lambda: vote_k(torch.ones(4, 3), 2, rho=1.0), "rho=1.0"),
    (lambda: vote_k(torch.ones(4, 3), 2, confidence=torch.ones(3)), "one score per pool example"),
    (lambda: random_demonstrations(0, 1), "pool is empty"),
    (lambda: random_demonstrations(3, 4), "k=4"),
    (lambda: order_by_entropy(0, lambda o: None), "no demonstrations"),
    (lambda: order_by_entropy(2, lambda o: None, criterion="x"), "criterion"),
])
def test_bad_input_is_refused_with_the_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call()
