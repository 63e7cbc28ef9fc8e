"""Retrieval for a target task: round-robin nearest neighbours against a brute-force selection."""

from __future__ import annotations

import pytest
import torch

from effref.data_selection import retrieve_for_task

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force(pool, queries, k):
    def cosine(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    rankings = [sorted(range(len(pool)), key=lambda i: (-cosine(q, pool[i]), i)) for q in queries]
    chosen = []
    for rank in range(len(pool)):
        for ranking in rankings:
            if ranking[rank] not in chosen and len(chosen) < k:
                chosen.append(ranking[rank])
    return chosen


@pytest.mark.parametrize("queries, k", [(1, 5), (3, 7), (4, 30)])
def test_retrieval_matches_brute_force(queries, k):
    generator = torch.Generator().manual_seed(queries)
    pool = torch.randn(30, 6, generator=generator, dtype=torch.float64)
    query = torch.randn(queries, 6, generator=generator, dtype=torch.float64)
    ours = retrieve_for_task(pool, query, k)
    assert ours.tolist() == brute_force(pool, query, k)
    assert len(set(ours.tolist())) == k


def test_one_query_takes_its_own_nearest_neighbours_and_scale_does_not_matter():
    pool = torch.tensor([[1.0, 0.0], [0.0, 1.0], [10.0, 1.0], [-1.0, 0.0]])
    assert retrieve_for_task(pool, torch.tensor([[2.0, 0.0]]), 2).tolist() == [0, 2]


@pytest.mark.parametrize("pool, query, k, message", [
    (torch.zeros(0, 2), torch.ones(1, 2), 1, r"pool is empty"),
    (torch.ones(3, 2), torch.ones(1, 2), 4, r"k=4 is larger than the pool of 3"),
    (torch.ones(3, 2), torch.zeros(0, 2), 1, r"set of target \(query\) examples is empty"),
    (torch.ones(3, 2), torch.ones(1, 3), 1, r"must share E"),
])
def test_bad_inputs_are_named(pool, query, k, message):
    with pytest.raises(ValueError, match=message):
        retrieve_for_task(pool, query, k)
