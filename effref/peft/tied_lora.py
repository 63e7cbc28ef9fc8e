"""Tied-LoRA: one pair of low-rank matrices shared by all layers, made layer-specific by two scaling vectors.

Paper: Renduchintala, Konuk, Kuchaiev (2024), "Tied-LoRA: Enhancing parameter efficiency of LoRA with weight
tying", arXiv:2311.09578 — §2, Eq. 2 and Table 1 (the TL1–TL6 variants).
Implements: ΔW_l = (α/r) · diag(v_l) B diag(u_l) A  for layer l, with A ∈ ℝ^{r×k} and B ∈ ℝ^{d×r} tied
(the same tensors) across every layer that has the same target name (all q_proj share one pair, all v_proj
another: their shapes differ under grouped-query attention), u_l ∈ ℝ^r starting at 1, v_l ∈ ℝ^d starting at
0 (the model is unchanged at initialisation). ``train_ab`` / ``train_uv`` choose which parts learn: both
trainable is the paper's "vBuA" (TL6); frozen A, B with trained u, v is "vB̄uĀ" (TL5, VeRA-like).
Glossary: A ``shared.A`` · B ``shared.B`` · u_l ``u`` · v_l ``v`` · r rank · α ``alpha``.
Left out: the paper's fused-QKV placement in NeMo (here q_proj and v_proj separately; GPT-2's own fused
          c_attn as one target), the other variants of Table 1 that drop u or v (set them frozen at 1 by hand).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from effref.checks import config_or_default
from effref.peft.core import MergeableAdapter, targets_or_default, wrap_modules


@dataclass
class TiedLoraConfig:
    r: int = 8
    alpha: float = 16
    target_modules: tuple[str, ...] | None = None  # None: the model's query and value projections
    train_ab: bool = True  # False: A and B stay at their random init (TL5)
    train_uv: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r} must be a positive integer rank, e.g. r=8")
        if not (self.train_ab or self.train_uv):
            raise ValueError("train_ab=False and train_uv=False leave nothing to train; enable one of them")
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)


class TiedFactors(nn.Module):
    """The A (r × k) and B (d × r) matrices shared by every layer of one target name."""

    def __init__(self, k: int, d: int, r: int, like: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, k, dtype=like.dtype, device=like.device))
        self.B = nn.Parameter(torch.empty(d, r, dtype=like.dtype, device=like.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))  # B ≠ 0, so that v gets a gradient; v = 0 instead


class TiedLoraLinear(MergeableAdapter):
    """``base(x) + (α/r) · v ⊙ (B (u ⊙ (A x)))`` with A, B from a shared ``TiedFactors``."""

    def __init__(self, base: nn.Module, shared: TiedFactors, alpha: float):
        super().__init__()
        r = shared.A.shape[0]
        self.base, self.shared, self.scaling = base, shared, alpha / r
        self.in_features, self.out_features = base.in_features, base.out_features
        self.u = nn.Parameter(torch.ones(r, dtype=shared.A.dtype, device=shared.A.device))  # u_l
        self.v = nn.Parameter(torch.zeros(base.out_features, dtype=shared.A.dtype, device=shared.A.device))  # v_l

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.v[:, None] * (self.shared.B * self.u) @ self.shared.A  # diag(v) B diag(u) A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        h = (x.to(self.shared.A.dtype) @ self.shared.A.T) * self.u  # (..., r): u ⊙ (A x)
        return out + (self.scaling * (h @ self.shared.B.T) * self.v).to(out.dtype)  # (..., d)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight().to(weight.dtype)


def apply_tied_lora(model: nn.Module, cfg: TiedLoraConfig) -> nn.Module:
    """Wrap the target linears, one ``TiedFactors`` per target name, and freeze everything else (in place)."""
    cfg = config_or_default(cfg, TiedLoraConfig, "TiedLoraConfig(r=8)")
    targets = targets_or_default(model, cfg.target_modules, "query_value")
    shared: dict[str, TiedFactors] = {}

    def make(name: str, layer: nn.Module) -> TiedLoraLinear:
        key = next(t for t in targets if name == t or name.endswith("." + t))
        if cfg.r > min(layer.in_features, layer.out_features):
            raise ValueError(f"r={cfg.r} exceeds min(in_features, out_features) = "
                             f"{min(layer.in_features, layer.out_features)} of layer {name}; pick r <= that")
        if key not in shared:
            like = next(iter(list(layer.parameters()) + list(layer.buffers())))
            shared[key] = TiedFactors(layer.in_features, layer.out_features, cfg.r,
                                      like if like.is_floating_point() else like.float())
        elif shared[key].A.shape[1] != layer.in_features or shared[key].B.shape[0] != layer.out_features:
            raise ValueError(f"layers named {key!r} differ in shape ({name}: {layer.in_features}→"
                             f"{layer.out_features}); tying needs equal shapes, target them separately")
        return TiedLoraLinear(layer, shared[key], cfg.alpha)

    for layer in wrap_modules(model, targets, make, skip=(TiedLoraLinear,)).values():
        layer.u.requires_grad_(cfg.train_uv)
        layer.v.requires_grad_(cfg.train_uv)
        layer.shared.A.requires_grad_(cfg.train_ab)
        layer.shared.B.requires_grad_(cfg.train_ab)
        if not cfg.train_ab:  # frozen but part of the adapter: save/load must carry them
            layer.frozen_adapter_tensors = ("shared.A", "shared.B")
    return model
