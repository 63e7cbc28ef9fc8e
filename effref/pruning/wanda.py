"""Wanda: pruning by weights and activations, with no weight update.

Paper: Sun, Liu, Bair, Kolter (2023), "A Simple and Effective Pruning Approach for Large Language Models",
arXiv:2306.11695 — Eq. 1 and §3 ("comparison group").
Implements: score S_ij = |W_ij| · ||X_j||₂, where ||X_j||₂ is the norm of input feature j over the n
calibration tokens (Eq. 1); within each output row (Wanda's per-output comparison group) zero the weights
with the lowest scores, k_i of them so the layer loses exactly round(s · numel); for N:M, the M − N lowest
of every M consecutive inputs of a row. The surviving weights are left untouched.
Glossary: W (d_out × d_in) · X (n × d_in) calibration inputs · S score · s sparsity.
          ||X_j||₂ = sqrt(n · mean_j(x²)) — the constant n does not change any comparison, so we use
          sqrt(mean x²) from ``InputStats.sq_mean``.
Left out: Wanda's optional per-layer sparsity variants and its LoRA fine-tuning experiments.
"""

from __future__ import annotations

import torch
from torch import nn

from effref.checks import calibration_or_none, config_or_default
from effref.compression.calibration import InputStats
from effref.pruning.masks import PruneConfig, prune_linears, prune_mask


def wanda_prune(weight: torch.Tensor, stats: InputStats, cfg: PruneConfig | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned copy of ``weight`` (out, in), mask) with Wanda's score |W| · ||X||₂ compared per output row."""
    cfg = config_or_default(cfg, PruneConfig, "PruneConfig(sparsity=0.5)")
    if stats is None or stats.sq_mean is None:
        raise ValueError("wanda_prune needs input statistics with sq_mean (mean x² per input channel); collect "
                         "them with needs=('sq_mean',)")
    if stats.sq_mean.shape != (weight.shape[1],):
        raise ValueError(f"stats.sq_mean has shape {tuple(stats.sq_mean.shape)} but the weight has "
                         f"in_features={weight.shape[1]}; pass the statistics of this layer's inputs")
    norms = stats.sq_mean.to(weight.device, torch.float32).sqrt()  # (in,) ||X_j||₂ / sqrt(n)
    scores = weight.abs().float() * norms[None, :]  # Eq. 1, (out, in)
    mask = prune_mask(scores, cfg, group="row")
    return weight.masked_fill(mask, 0), mask


def wanda_prune_model(model: nn.Module, calib_batches: torch.Tensor | None = None, cfg: PruneConfig | None = None,
                      **kwargs) -> dict[str, torch.Tensor]:
    """Wanda on every linear of the decoder blocks, in place; {name: mask}. See ``prune_linears``."""
    calib_batches = calibration_or_none(calib_batches, "wanda_prune_model")
    return prune_linears(model, wanda_prune, cfg, needs=("sq_mean",), calib_batches=calib_batches,
                         desc="wanda", **kwargs)
