"""Retrieval-based task data selection: fine-tune on the pool examples nearest to a few target examples.

Paper: Ivison, Smith, Hajishirzi, Dasigi (2023), "Data-Efficient Finetuning Using Cross-Task Nearest
Neighbors", arXiv:2212.00196 — §2 (retrieval of multitask data with a few unlabeled target examples).
Implements: the pool and the target examples are embedded; cosine similarity s(q, x) = q·x / (‖q‖‖x‖)
ranks the pool for every target example q; the selection takes the best-ranked neighbour of every query in
turn (round-robin over rank 1, then rank 2, …), skipping examples already taken, until k are chosen — each
target example contributes about equally, and nothing is picked twice.
Glossary: q = a row of ``query_embeddings`` (Q, E) · x = a row of ``pool_embeddings`` (N, E) · k kept.
Simplified: the embedding is the caller's (the paper uses a T5 encoder's mean-pooled states; the chapter
uses hashed n-grams, ``dsir.hashed_ngram_features``); exact search instead of the paper's FAISS index.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from effref.data_selection.common import check_k, check_pool_size


def retrieve_for_task(pool_embeddings: torch.Tensor, query_embeddings: torch.Tensor, k: int) -> torch.LongTensor:
    """Indices of ``k`` distinct pool examples, round-robin over every query's nearest neighbours: (k,)."""
    if pool_embeddings.dim() != 2 or query_embeddings.dim() != 2 or \
            pool_embeddings.shape[1] != query_embeddings.shape[1]:
        raise ValueError(f"pool_embeddings (N, E) and query_embeddings (Q, E) must share E, got "
                         f"{tuple(pool_embeddings.shape)} and {tuple(query_embeddings.shape)}")
    check_k(k, len(pool_embeddings))
    check_pool_size(len(query_embeddings), "set of target (query) examples")
    similarity = F.normalize(query_embeddings.double(), dim=1) @ F.normalize(pool_embeddings.double(), dim=1).T
    ranking = torch.sort(similarity, dim=1, descending=True, stable=True).indices  # (Q, N)
    chosen, taken = [], set()
    for candidate in ranking.T.flatten().tolist():  # rank 1 of every query, then rank 2, …
        if candidate not in taken:
            taken.add(candidate)
            chosen.append(candidate)
            if len(chosen) == k:
                break
    return torch.tensor(chosen, dtype=torch.long)
