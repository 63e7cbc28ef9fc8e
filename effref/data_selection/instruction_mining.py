"""Instruction Mining: a linear model of quality indicators predicts the loss a fine-tuning set will give.

Paper: Cao, Kang, Wang, Sun (2023), "Instruction Mining: Instruction Data Selection for Tuning Large
Language Models", arXiv:2307.06290 — §2 (Eq. 1–2: the linear quality rule).
Implements: many candidate fine-tuning sets D_j are scored by natural-language indicators I_1…I_F
(averaged over the examples of the set) and a model is fine-tuned on each to measure its evaluation loss.
A linear rule is fitted by least squares,

    L_eval(D_j) ≈ β_0 + Σ_f β_f · I_f(D_j),

and afterwards a new example x is valued by the same rule on its own indicators, Q(x) = β_0 + Σ β_f I_f(x)
(lower predicted loss = better), keeping the k best — no further fine-tuning needed.
Glossary: I = ``indicators`` (M sets or N examples, F) · L_eval = ``losses`` (M,) · β_0 = ``intercept`` ·
β = ``coefficients`` · Q = ``predicted_loss``.
Simplified/left out: indicators are whatever the caller measures (the paper's are reward-model score,
UniEval naturalness/coherence/understandability, perplexity, MTLD, KNN-6 and lengths; the chapter uses
cheap ones); indicators are standardized before the fit (the paper fits on raw values); optional ridge
penalty; the paper's BlendSearch over the selected-set size is left out (k is given).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effref.data_selection.common import check_pool_size, top_k_indices


@dataclass(frozen=True)
class QualityRule:
    """β_0 and β on standardized indicators (``mean``/``scale`` are the fit's column statistics)."""

    intercept: float
    coefficients: torch.Tensor  # (F,)
    mean: torch.Tensor  # (F,)
    scale: torch.Tensor  # (F,)

    def predicted_loss(self, indicators: torch.Tensor) -> torch.Tensor:
        """Q = β_0 + Σ β_f (I_f − mean_f)/scale_f for every row of ``indicators`` (·, F): (·,)."""
        if indicators.dim() != 2 or indicators.shape[1] != len(self.coefficients):
            raise ValueError(f"indicators must be (N, {len(self.coefficients)}), got {tuple(indicators.shape)}")
        return self.intercept + ((indicators.double() - self.mean) / self.scale) @ self.coefficients


def fit_quality_rule(indicators: torch.Tensor, losses: torch.Tensor, ridge: float = 0.0) -> QualityRule:
    """Least-squares fit (plus ``ridge``·‖β‖²) of ``losses`` (M,) on ``indicators`` (M, F) of M sets."""
    if indicators.dim() != 2 or losses.dim() != 1 or len(losses) != indicators.shape[0]:
        raise ValueError(f"indicators must be (M, F) and losses (M,), got {tuple(indicators.shape)} and "
                         f"{tuple(losses.shape)}")
    if indicators.shape[0] < indicators.shape[1] + 1 and ridge == 0:
        raise ValueError(f"{indicators.shape[0]} sets cannot determine {indicators.shape[1]} coefficients and an "
                         "intercept; measure more sets or pass ridge > 0")
    if ridge < 0:
        raise ValueError(f"ridge={ridge} must be ≥ 0")
    x = indicators.double()
    mean, scale = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-12)  # (F,), (F,)
    design = torch.cat([torch.ones(len(x), 1, dtype=x.dtype), (x - mean) / scale], dim=1)  # (M, F+1)
    penalty = ridge * torch.eye(design.shape[1], dtype=x.dtype)
    penalty[0, 0] = 0  # the intercept is not penalized
    beta = torch.linalg.solve(design.T @ design + penalty, design.T @ losses.double())  # (F+1,) normal eqs
    return QualityRule(intercept=beta[0].item(), coefficients=beta[1:], mean=mean, scale=scale)


def select_by_quality(rule: QualityRule, indicators: torch.Tensor, k: int) -> torch.LongTensor:
    """The ``k`` examples with the lowest predicted loss under ``rule``, best first: (k,)."""
    check_pool_size(len(indicators), "pool of examples")
    return top_k_indices(-rule.predicted_loss(indicators), k)
