"""Shared machinery of the data-selection methods: argument checks, top-k, and Gumbel top-k sampling.

Every selector in this subpackage ends the same way — keep ``k`` items of a pool, or a fraction ``ratio``
of it, by a score — so the checks and the two ways of choosing live here once.

Gumbel top-k (Vieira 2014; Kool, van Hoof, Welling 2019, "Stochastic beams and where to find them", §3):
adding independent standard Gumbel noise ``g_i`` to log-weights ``log w_i`` and keeping the ``k`` largest
``log w_i + g_i`` draws ``k`` items *without replacement*, each successive item with probability
proportional to its weight among those not yet drawn — the sampling DSIR uses (Xie et al. 2023b, §4).
Glossary: w_i importance weight · g_i ~ Gumbel(0, 1) = −log(−log U), U ~ Uniform(0, 1) · k items kept.
"""

from __future__ import annotations

import torch


def check_pool_size(n: int, what: str = "pool") -> None:
    """Raise ValueError when a pool is empty."""
    if n < 1:
        raise ValueError(f"the {what} is empty; pass at least one example to select from")


def check_k(k: int, n: int, what: str = "pool") -> None:
    """``k`` must be an integer in 1 … ``n`` (the pool size)."""
    check_pool_size(n, what)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be an integer ≥ 1 (the number of examples to keep)")
    if k > n:
        raise ValueError(f"k={k} is larger than the {what} of {n} examples; use k ≤ {n}")


def k_from_ratio(ratio: float, n: int, what: str = "pool") -> int:
    """The number of examples ``ratio`` ∈ (0, 1] of a pool of ``n`` keeps: ``max(1, round(ratio · n))``."""
    check_pool_size(n, what)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"ratio={ratio!r} must lie in (0, 1] (the fraction of the {what} to keep)")
    return max(1, round(ratio * n))


def top_k_indices(scores: torch.Tensor, k: int) -> torch.LongTensor:
    """Indices of the ``k`` largest ``scores`` (ties broken by the lower index), best first: (k,)."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (one score per example), got shape {tuple(scores.shape)}")
    check_k(k, len(scores))
    order = torch.sort(scores, descending=True, stable=True).indices  # (N,)
    return order[:k]


def gumbel_top_k(log_weights: torch.Tensor, k: int, seed: int = 0) -> torch.LongTensor:
    """Draw ``k`` indices without replacement, successively proportional to ``exp(log_weights)``: (k,).

    The noise comes from a private generator seeded with ``seed``: the same seed gives the same draw and
    the global random state is untouched. Items with ``log_weight = -inf`` are never drawn before others.
    """
    if log_weights.dim() != 1:
        raise ValueError(f"log_weights must be 1-D, got shape {tuple(log_weights.shape)}")
    check_k(k, len(log_weights))
    if torch.isnan(log_weights).any() or torch.isposinf(log_weights).any():
        raise ValueError("log_weights contains NaN or +inf; pass finite log-weights (or -inf to exclude)")
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(len(log_weights), generator=generator, dtype=torch.float64)  # (N,)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float64).tiny)))  # (N,)
    keys = log_weights.detach().double().cpu() + gumbel  # (N,)
    return top_k_indices(keys, k)
