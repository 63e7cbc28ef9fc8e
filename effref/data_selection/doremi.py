"""DoReMi: optimizing data mixtures (domain weights) with a small proxy model and group DRO.

Paper: Xie, Pham, Dong, Du, Liu, Lu, Liang, Le, Ma, Yu (2023a), "DoReMi: Optimizing Data Mixtures Speeds
Up Language Model Pretraining", arXiv:2305.10429 — Algorithm 1.
Implements: given a reference model (trained on the default mixture), a proxy model is trained with
Group DRO over domains. At every step t, with minibatch B_i from each domain i:

    λ_t[i] = mean over tokens of B_i of max(ℓ_θ(x) − ℓ_ref(x), 0)              (per-domain excess loss)
    α'_t = α_{t−1} ⊙ exp(η λ_t),  α_t = (1 − c) α'_t / Σ α'_t + c u               (exponentiated gradient)
    θ ← θ − lr ∇_θ Σ_i α_t[i] · mean over tokens of B_i of ℓ_θ(x)              (weighted proxy update)

and the returned domain weights are the average ᾱ = (1/T) Σ_t α_t, with which a (larger) model is then
trained on the reweighted mixture.
Glossary: α = ``weights`` · λ = ``excess`` · η = ``step_size`` (1 in the paper) · c = ``smoothing``
(1e-3 in the paper) · u = uniform weights · ℓ per-token loss.
Simplified: the proxy is as small as the reference (the paper trains a 280M proxy for an 8B model); each
domain contributes an equal-size minibatch every step; Adam instead of the paper's Adafactor; the loss
is per next-token prediction (one token per example), so "per token" and "per example" coincide.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from effref.runtime import progress_bar

DomainBatch = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def doremi_update(weights: torch.Tensor, excess: torch.Tensor, step_size: float = 1.0,
                  smoothing: float = 1e-3) -> torch.Tensor:
    """One exponentiated-gradient step on the domain weights: ``(1−c)·softmax(log α + η λ) + c·u``: (k,)."""
    if weights.dim() != 1 or weights.shape != excess.shape:
        raise ValueError(f"weights {tuple(weights.shape)} and excess {tuple(excess.shape)} must be the same "
                         "1-D shape (one entry per domain)")
    if (weights < 0).any() or not torch.isclose(weights.sum(), weights.new_tensor(1.0)):
        raise ValueError("weights must be a probability vector (non-negative, summing to 1)")
    if not 0 <= smoothing <= 1:
        raise ValueError(f"smoothing={smoothing} must lie in [0, 1] (the paper uses 1e-3)")
    tilted = torch.softmax(weights.log() + step_size * excess, dim=0)  # (k,) = α' / Σ α'
    return (1 - smoothing) * tilted + smoothing / len(weights)


@dataclass(frozen=True)
class DoReMiResult:
    """Averaged domain weights ᾱ (k,) and the per-step weights α_t and excess losses λ_t (T, k)."""

    weights: torch.Tensor
    history: torch.Tensor
    excess: torch.Tensor


def doremi_weights(proxy: nn.Module, reference: nn.Module, domain_batch: DomainBatch, num_domains: int,
                   steps: int, lr: float = 3e-3, step_size: float = 1.0, smoothing: float = 1e-3,
                   seed: int = 0) -> DoReMiResult:
    """Train ``proxy`` with Group DRO against ``reference`` and return the averaged domain weights.

    ``domain_batch(i, generator)`` returns ``(inputs, targets)`` of domain ``i``; models map inputs to
    next-token logits (B, V). The proxy is trained in place; the reference is only evaluated.
    """
    if isinstance(num_domains, bool) or not isinstance(num_domains, int) or num_domains < 2:
        raise ValueError(f"num_domains={num_domains!r} must be an integer ≥ 2 (DoReMi weighs domains)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer ≥ 1")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(proxy.parameters(), lr=lr)
    weights = torch.full((num_domains,), 1.0 / num_domains)  # α_0 = u
    history, excesses = [], []
    for _ in progress_bar(range(steps), desc="DoReMi proxy", leave=False):
        batches = [domain_batch(i, generator) for i in range(num_domains)]
        proxy_losses = [F.cross_entropy(proxy(x), y, reduction="none") for x, y in batches]  # k × (B_i,)
        with torch.no_grad():
            reference_losses = [F.cross_entropy(reference(x), y, reduction="none") for x, y in batches]
            excess = torch.stack([(p - r).clamp_min(0).mean()
                                  for p, r in zip(proxy_losses, reference_losses)])  # λ_t (k,)
            weights = doremi_update(weights, excess, step_size, smoothing)  # α_t (k,)
        objective = sum(w * loss.mean() for w, loss in zip(weights, proxy_losses))
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()
        history.append(weights)
        excesses.append(excess)
    history_tensor = torch.stack(history)  # (T, k)
    return DoReMiResult(weights=history_tensor.mean(0), history=history_tensor, excess=torch.stack(excesses))
