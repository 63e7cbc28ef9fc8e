"""Choosing and ordering in-context demonstrations: KATE, Vote-k, and ordering by distance or by entropy.

Papers: Liu, Shen, Zhang, Dolan, Carin, Chen (2022), "What Makes Good In-Context Examples for GPT-3?",
DeeLIO, arXiv:2101.06804 (KATE) — §3; Su, Kasai, Wu, Shi, Wang, Xin, Zhang, Ostendorf, Zettlemoyer, Smith, Yu
(2023), "Selective Annotation Makes Language Models Better Few-Shot Learners", ICLR, arXiv:2209.01975 (Vote-k)
— §2.1, Algorithm 1; Lu, Bartolo, Moore, Riedel, Stenetorp (2022), "Fantastically Ordered Prompts and Where to
Find Them", ACL, arXiv:2104.08786 — §4 (GlobalE, LocalE).
Implements:
  KATE: for a test input with embedding q, the k pool examples of highest cosine similarity
        cos(q, e_i) = q·e_i / (‖q‖ ‖e_i‖), ties to the lower index.
  Vote-k: a directed k-nearest-neighbour graph G over the unlabelled pool (v → u when u is one of v's k
        neighbours); greedily add to the selected set L the vertex
          u* = argmax_{u ∉ L} Σ_{v ∉ L, v → u} s(v),   s(v) = ρ^(−|{ℓ ∈ L : v → ℓ}|)
        so each vote of v is discounted by ρ for every already-selected neighbour of v (diversity). With a
        ``confidence`` per example, only the first M/10 are chosen this way; the rest of the pool is sorted
        by confidence, cut into equal buckets and the best-voted example of each bucket joins L (§2.1's second
        stage, which the paper computes from the LM's confidence on the first M/10 as demonstrations).
  Ordering by distance: KATE's order, the most similar demonstration last (next to the test input) or first.
  Ordering by entropy probing: for each candidate order of the demonstrations, the model labels a set of
        probe inputs; GlobalE = H(histogram of predicted labels over the probes) and LocalE = mean over probes
        of H(p(label | order, probe)). A good order predicts balanced labels: keep the order of highest
        GlobalE (or LocalE).
Glossary: q / e_i embeddings of the test input / pool example i · k neighbours · M ``budget`` · ρ ``rho``
          · L selected set · s(v) discounted vote of v · GlobalE / LocalE the two probing entropies.
Left out (simplified): the embeddings are our LM's mean-pooled hidden states (``lm.embed_texts``), not
RoBERTa or Sentence-BERT; Lu et al. generate their probe set by sampling from the model with each order,
here the caller passes unlabelled probe inputs (held-out texts).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def _check_pool(pool: torch.Tensor, k: int, name: str = "pool_embeddings") -> None:
    if pool.dim() != 2 or pool.shape[0] == 0:
        raise ValueError(f"{name} has shape {tuple(pool.shape)}; need a non-empty (N, d) tensor")
    if not 1 <= k <= pool.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the pool size {pool.shape[0]}; pick a smaller k or "
                         "a larger pool")


def random_demonstrations(n_pool: int, k: int, seed: int = 0) -> list[int]:
    """k distinct pool indices drawn uniformly, the same for the same seed (the usual baseline)."""
    if n_pool < 1:
        raise ValueError(f"n_pool={n_pool}: the pool is empty; pass at least one example")
    if not 1 <= k <= n_pool:
        raise ValueError(f"k={k} must be between 1 and the pool size {n_pool}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_pool, generator=generator)[:k].tolist()


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a_i, b_j) for every pair, (N_a, N_b)."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T  # (N_a, N_b)


def kate(query_embeddings: torch.Tensor, pool_embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """KATE: the k pool indices most similar to each query, most similar first; (Q, k) for (Q, d) queries."""
    _check_pool(pool_embeddings, k)
    if query_embeddings.dim() != 2 or query_embeddings.shape[1] != pool_embeddings.shape[1]:
        raise ValueError(f"query_embeddings has shape {tuple(query_embeddings.shape)}; need (Q, "
                         f"{pool_embeddings.shape[1]}) like the pool")
    sims = cosine_similarity_matrix(query_embeddings, pool_embeddings)  # (Q, N)
    # a stable sort on −similarity keeps the lower index first among ties
    return torch.sort(-sims, dim=1, stable=True).indices[:, :k]  # (Q, k)


def knn_graph(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean adjacency (N, N): row v is True at v's k nearest neighbours by cosine similarity (not v itself)."""
    _check_pool(embeddings, k + 1, "embeddings")  # k neighbours besides v itself
    sims = cosine_similarity_matrix(embeddings, embeddings)  # (N, N)
    sims.fill_diagonal_(-math.inf)
    neighbours = torch.sort(-sims, dim=1, stable=True).indices[:, :k]  # (N, k)
    return torch.zeros_like(sims, dtype=torch.bool).scatter_(1, neighbours, True)  # (N, N)


def _greedy_votes(graph: torch.Tensor, selected: list[int], rho: float, allowed: torch.Tensor) -> int:
    """The unselected vertex in ``allowed`` with the largest discounted vote (Algorithm 1, one step)."""
    chosen = torch.zeros(graph.shape[0], dtype=torch.bool)
    chosen[selected] = True
    n_selected_neighbours = graph[:, chosen].sum(1).float()  # (N,): |{ℓ ∈ L : v → ℓ}|
    weight = rho ** -n_selected_neighbours  # (N,): s(v)
    weight[chosen] = 0.0  # selected vertices no longer vote
    votes = (graph.float() * weight[:, None]).sum(0)  # (N,): Σ_{v → u} s(v)
    votes[chosen | ~allowed] = -math.inf
    return int(torch.argmax(votes))  # the first maximum: ties to the lower index


def vote_k(embeddings: torch.Tensor, budget: int, k: int = 10, rho: float = 10.0,
           confidence: torch.Tensor | None = None) -> list[int]:
    """Vote-k selective annotation: ``budget`` diverse, representative pool indices, in the order chosen.

    Without ``confidence`` all ``budget`` examples come from the graph's discounted votes; with a confidence per
    pool example (e.g. the LM's mean log-probability of its label), the first ``max(1, budget // 10)`` do, and
    the rest are the best-voted example of each of ``budget − M/10`` equal confidence buckets.
    """
    _check_pool(embeddings, budget, "embeddings")
    if rho <= 1:
        raise ValueError(f"rho={rho} must be > 1 (each selected neighbour divides a vote by rho); the paper "
                         "uses 10")
    n = embeddings.shape[0]
    if confidence is not None and confidence.shape != (n,):
        raise ValueError(f"confidence has shape {tuple(confidence.shape)}; need one score per pool example, "
                         f"({n},)")
    graph = knn_graph(embeddings, min(k, n - 1)) if n > 1 else torch.zeros(1, 1, dtype=torch.bool)
    everyone = torch.ones(n, dtype=torch.bool)
    first_stage = budget if confidence is None else max(1, budget // 10)
    selected: list[int] = []
    for _ in range(first_stage):
        selected.append(_greedy_votes(graph, selected, rho, everyone))
    if len(selected) < budget:
        rest = [i for i in torch.argsort(confidence, stable=True).tolist() if i not in selected]
        n_buckets = budget - len(selected)
        for bucket in range(n_buckets):
            members = rest[bucket * len(rest) // n_buckets:(bucket + 1) * len(rest) // n_buckets]
            allowed = torch.zeros(n, dtype=torch.bool)
            allowed[members] = True
            selected.append(_greedy_votes(graph, selected, rho, allowed))
    return selected


def order_by_distance(query_embedding: torch.Tensor, demo_embeddings: torch.Tensor,
                      most_similar_last: bool = True) -> list[int]:
    """Positions of the demonstrations sorted by similarity to the query; the most similar last by default."""
    _check_pool(demo_embeddings, 1, "demo_embeddings")
    sims = cosine_similarity_matrix(query_embedding.reshape(1, -1), demo_embeddings)[0]  # (k,)
    order = torch.sort(sims, stable=True, descending=not most_similar_last).indices
    return order.tolist()


def label_entropies(label_probs: torch.Tensor) -> tuple[float, float]:
    """(GlobalE, LocalE) of a probing run: label_probs (P, C) is p(label | order, probe) for P probes."""
    if label_probs.dim() != 2 or label_probs.shape[0] == 0:
        raise ValueError(f"label_probs has shape {tuple(label_probs.shape)}; need (probes, labels)")
    predicted = torch.bincount(label_probs.argmax(1), minlength=label_probs.shape[1]).float()  # (C,)
    p_hat = predicted / predicted.sum()
    global_e = -(p_hat * p_hat.clamp_min(1e-12).log()).sum()
    p = label_probs / label_probs.sum(1, keepdim=True)  # (P, C)
    local_e = -(p * p.clamp_min(1e-12).log()).sum(1).mean()
    return float(global_e), float(local_e)


def order_by_entropy(n_demos: int, probe_label_probs: Callable[[Sequence[int]], torch.Tensor],
                     max_orders: int = 24, criterion: str = "global", seed: int = 0
                     ) -> tuple[list[int], list[tuple[tuple[int, ...], float, float]]]:
    """The order of ``n_demos`` demonstrations with the highest probing entropy, and every order's scores.

    ``probe_label_probs(order)`` returns p(label | demonstrations in ``order``, probe), (P, C), for the probe
    set. All n! orders are tried when n! ≤ ``max_orders``; otherwise ``max_orders`` distinct random orders.
    """
    if n_demos < 1:
        raise ValueError(f"n_demos={n_demos}: there are no demonstrations to order")
    if criterion not in ("global", "local"):
        raise ValueError(f"criterion={criterion!r}; use 'global' (GlobalE) or 'local' (LocalE)")
    if max_orders < 1:
        raise ValueError(f"max_orders={max_orders} must be at least 1")
    if math.factorial(n_demos) <= max_orders:
        orders = list(itertools.permutations(range(n_demos)))
    else:
        generator, seen = torch.Generator().manual_seed(seed), set()
        while len(seen) < max_orders:
            seen.add(tuple(torch.randperm(n_demos, generator=generator).tolist()))
        orders = sorted(seen)
    scores = [(order, *label_entropies(probe_label_probs(order))) for order in orders]
    column = 1 if criterion == "global" else 2
    best = max(scores, key=lambda row: row[column])  # the first of equal scores
    return list(best[0]), scores
