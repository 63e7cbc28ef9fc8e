"""Parameter pruning (survey §2.1.2): one module per method, sharing masks and the calibration walk.

Unstructured and N:M: ``magnitude``, ``wanda``, ``sparsegpt`` (with ``masks`` for configs and exact counts and
``sensitivity`` for Hessian-based mixed per-layer sparsity). Structured: ``llm_pruner`` with ``recovery`` (LoRA).
"""

from effref.pruning.llm_pruner import LLMPrunerConfig, llm_prune, ratio_for_fraction, removed_fraction
from effref.pruning.magnitude import magnitude_prune, magnitude_prune_model
from effref.pruning.masks import PruneConfig, prune_linears, prune_mask, sparsity_report
from effref.pruning.recovery import lora_recover
from effref.pruning.sensitivity import hessian_sensitivity_sparsities
from effref.pruning.sparsegpt import SparseGPTConfig, sparsegpt_prune, sparsegpt_prune_model
from effref.pruning.wanda import wanda_prune, wanda_prune_model

__all__ = ["LLMPrunerConfig", "PruneConfig", "SparseGPTConfig", "hessian_sensitivity_sparsities", "llm_prune",
           "lora_recover", "magnitude_prune", "magnitude_prune_model", "prune_linears", "prune_mask",
           "ratio_for_fraction", "removed_fraction", "sparsegpt_prune", "sparsegpt_prune_model", "sparsity_report",
           "wanda_prune", "wanda_prune_model"]
