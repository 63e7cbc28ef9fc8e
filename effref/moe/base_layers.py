"""BASE layers: token-to-expert allocation as a linear assignment problem, so that every expert gets T/E tokens.

Paper: Lewis, Bhosale, Dettmers, Goyal, Zettlemoyer (2021), "BASE Layers: Simplifying Training of Large, Sparse
Models", ICML 2021, arXiv:2103.16716 — §2 (Eqs. 1–4).
Implements: expert embeddings w_e and token–expert affinities s_te = h_t · w_e; in training the assignment
a maximising Σ_t h_t · w_{a_t} subject to every expert receiving exactly T/E tokens (Eq. 2), solved exactly;
at test time the greedy a_t = argmax_e h_t · w_e (§2.3); the output  h_t + σ(h_t · w_{a_t}) · f_{a_t}(h_t)
(Eq. 3: the expert's contribution gated by a sigmoid of its affinity; the residual is the block's). No
auxiliary loss: balance is a constraint, not a penalty. The assignment is solved by the Hungarian method
(Kuhn 1955; Jonker–Volgenant's shortest augmenting paths with potentials) on the T × T matrix that repeats each
expert's column T/E times, one row of the search vectorised over columns.
Glossary: h_t token representation · w_e expert embedding (row e of ``gate.weight``) · a_t the token's expert
          · T tokens · E experts · T/E tokens per expert · u, v dual potentials of rows and columns.
Left out: the auction algorithm the paper runs on GPUs (approximate for real-valued scores; ours is exact), the
          random shuffling of tokens across workers before assignment, and the multi-worker all-to-all.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from effref.moe.experts import Routing, check_experts


def linear_assignment(cost: np.ndarray) -> np.ndarray:
    """For a square cost matrix (n, n), the column of each row minimising Σ_i cost[i, col[i]] exactly: (n,) ints.

    Hungarian method with potentials: rows enter one at a time; a Dijkstra-like search over reduced costs
    cost[i, j] − u[i] − v[j] ≥ 0 finds the cheapest augmenting path, and the potentials keep the reduced costs of
    the matched pairs at zero. O(n³) arithmetic, O(n²) vectorised steps.
    """
    cost = np.asarray(cost, dtype=np.float64)
    n = cost.shape[0]
    if cost.ndim != 2 or cost.shape[1] != n or not np.isfinite(cost).all():
        raise ValueError(f"cost must be a finite square matrix, got shape {cost.shape}")
    u, v = np.zeros(n + 1), np.zeros(n + 1)  # potentials; index 0 is a virtual column
    row_of = np.zeros(n + 1, dtype=np.int64)  # row_of[j]: the row matched to column j (1-based), 0 = free
    for i in range(1, n + 1):
        row_of[0], j0 = i, 0
        min_reduced = np.full(n + 1, np.inf)  # cheapest reduced cost to reach each column so far
        came_from = np.zeros(n + 1, dtype=np.int64)  # previous column on that cheapest path
        used = np.zeros(n + 1, dtype=bool)
        while True:  # grow the search tree until it reaches a free column
            used[j0] = True
            i0 = row_of[j0]
            reduced = cost[i0 - 1] - u[i0] - v[1:]  # (n,) reduced costs from row i0 to every column
            better = ~used[1:] & (reduced < min_reduced[1:])
            min_reduced[1:][better] = reduced[better]
            came_from[1:][better] = j0
            free = np.flatnonzero(~used[1:]) + 1
            j1 = free[np.argmin(min_reduced[free])]
            delta = min_reduced[j1]
            u[row_of[used]] += delta  # shift potentials so every edge on the search tree stays tight
            v[used] -= delta
            min_reduced[~used] -= delta
            j0 = j1
            if row_of[j0] == 0:
                break
        while j0:  # augment along the path back to the virtual column
            j1 = came_from[j0]
            row_of[j0] = row_of[j1]
            j0 = j1
    col = np.empty(n, dtype=np.int64)
    col[row_of[1:] - 1] = np.arange(n)
    return col


def balanced_assignment(scores: torch.Tensor) -> torch.Tensor:
    """The expert of each token, (T,), maximising Σ_t scores[t, a_t] with exactly T/E tokens per expert (Eq. 2).

    Expert e owns columns e·T/E … (e+1)·T/E − 1 of a T × T assignment problem on cost −scores.
    """
    T, E = scores.shape
    if T % E:
        raise ValueError(f"{T} tokens cannot be split evenly over n_experts={E}; BASE training needs a token "
                         f"count divisible by the expert count (use a batch of a multiple of {E} tokens)")
    per_expert = T // E
    cost = -scores.detach().double().cpu().numpy().repeat(per_expert, axis=1)  # (T, T)
    return torch.from_numpy(linear_assignment(cost) // per_expert).to(scores.device)


class BaseRouter(nn.Module):
    """Balanced assignment in training, greedy at evaluation; the gate of a token's expert is σ(h · w_a)."""

    def __init__(self, d_model: int, n_experts: int):
        super().__init__()
        check_experts(n_experts)
        self.n_experts = n_experts
        self.gate = nn.Linear(d_model, n_experts, bias=False)  # rows are the expert embeddings w_e

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        scores = self.gate(x).float()  # (T, E) h_t · w_e
        expert = balanced_assignment(scores) if self.training else scores.argmax(-1)  # (T,)
        token = torch.arange(x.shape[0], device=x.device)
        weight = torch.sigmoid(scores[token, expert])  # (T,) Eq. 3's gate
        return Routing(token, expert, weight, probs=scores.softmax(-1), aux_loss=torch.zeros((), device=x.device))
