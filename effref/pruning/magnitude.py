"""Magnitude pruning: the baseline every LLM pruning paper starts from.

Paper: Han, Pool, Tran, Dally (2015), "Learning both weights and connections", arXiv:1506.02626; used as
the one-shot baseline of SparseGPT (Frantar & Alistarh, 2023, arXiv:2301.00774, Table 1) and Wanda.
Implements: score S_ij = |W_ij|; zero the k = round(s · numel) smallest scores of each layer (layer-wise,
as in SparseGPT's baseline), or the M − N smallest of every M consecutive inputs of a row for N:M.
No calibration data, no weight update.
Glossary: W (d_out × d_in) weight · s sparsity · S score · N:M keep N of every M.
Left out: global (cross-layer) magnitude thresholds and iterative prune–retrain schedules.
"""

from __future__ import annotations

import torch
from torch import nn

from effref.checks import config_or_default
from effref.pruning.masks import PruneConfig, prune_linears, prune_mask


def magnitude_prune(weight: torch.Tensor, stats=None, cfg: PruneConfig | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned copy of ``weight`` (out, in), mask with True = pruned) by |W| per layer; ``stats`` is unused."""
    cfg = config_or_default(cfg, PruneConfig, "PruneConfig(sparsity=0.5)")
    mask = prune_mask(weight.abs(), cfg, group="layer")  # (out, in)
    return weight.masked_fill(mask, 0), mask


def magnitude_prune_model(model: nn.Module, cfg: PruneConfig, **kwargs) -> dict[str, torch.Tensor]:
    """Magnitude-prune every linear of ``model``'s decoder blocks in place; {name: mask}. See ``prune_linears``."""
    return prune_linears(model, magnitude_prune, cfg, needs=(), desc="magnitude", **kwargs)
