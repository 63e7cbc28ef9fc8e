"""QA-LoRA: quantization-aware LoRA whose adapter merges into the group-quantized weight.

Paper: Xu, Xie, Gu, Chen, Chang, Zhang, Chen, Zhang, Tian (2023), "QA-LoRA: Quantization-Aware Low-Rank
Adaptation of Large Language Models", arXiv:2309.14717 — §3.3, Algorithm 1.
Implements: a frozen base with group-wise INT-b weights Ŵ = s ⊙ (Q − z), one (s, z) per output channel and
group of L consecutive inputs (``effref.peft.peqa.GroupQuantLinear``, scales frozen), plus an adapter that
sees the input averaged within each group:

    y = Ŵx + (α/r) · B A pool(x),    pool(x)_g = (1/L) Σ_{i ∈ g} x_i,   A ∈ ℝ^{r×G}, B ∈ ℝ^{d×r}.

Because of the pooling, the adapter's weight ΔW_{o,i} = (α/r)(BA)_{o,g(i)} / L is constant over each group,
so it is absorbed into the zero points without touching the integer codes:
s(Q − z') = s(Q − z) + ΔW  ⇔  z' = z − (α/r)(BA) / (L s). The merged layer is still a b-bit group-quantized
layer (same codes, same scales, float zero points), which plain LoRA (ΔW varying inside a group) cannot
promise; QLoRA must merge into a float weight and re-quantize (with new error).
Glossary: Q codes · s scales · z zero points (all out × G except Q) · L ``group_size`` · G = in / L
          · A ``lora_A`` (r × G) · B ``lora_B`` (d × r) · α ``alpha`` · r rank.
Left out: GPTQ initialisation of the base (RTN here), the paper's 2/3-bit settings and CUDA kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from effref.checks import config_or_default
from effref.peft.core import freeze_base, linear_targets, replace_all, targets_or_default
from effref.peft.peqa import GroupQuantLinear
from effref.runtime import progress_bar


@dataclass(frozen=True)
class QALoraConfig:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    bits: int = 4
    group_size: int = 32  # L; the paper uses 32 (G = in / 32 adapter inputs)
    target_modules: tuple[str, ...] | None = None  # None: every linear of the model's blocks

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r} must be a positive integer rank, e.g. r=8")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1), e.g. 0.05")


class QALoraLinear(nn.Module):
    """``base(x) + (alpha / r) · B A pool(dropout(x))`` around a frozen ``GroupQuantLinear``."""

    def __init__(self, base: GroupQuantLinear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, GroupQuantLinear):
            raise TypeError(f"QA-LoRA needs a GroupQuantLinear base (group-quantized codes to merge into), got "
                            f"{type(base).__name__}; build one with GroupQuantLinear(linear, bits, group_size)")
        groups = base.in_features // base.group_size  # G
        if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= min(groups, base.out_features):
            raise ValueError(f"r={r!r} must satisfy 0 < r <= min(groups, out_features) = "
                             f"{min(groups, base.out_features)} (groups = {base.in_features} / group_size "
                             f"{base.group_size}); pick a smaller rank or a smaller group_size")
        base.scale.requires_grad_(False)
        self.base, self.in_features, self.out_features = base, base.in_features, base.out_features
        self.r, self.alpha, self.scaling, self.group_size = r, alpha, alpha / r, base.group_size
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(groups, r, bias=False, device=base.zero.device)  # A: (r, G)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.zero.device)  # B: (d, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # the adapter starts silent, as in LoRA
        self.merged = False
        self._premerge_zero: torch.Tensor | None = None

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Average each group of ``group_size`` consecutive inputs: (..., in) -> (..., G)."""
        return x.unflatten(-1, (-1, self.group_size)).mean(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (..., d)
        if self.merged:
            return out
        a = self.lora_A.weight
        update = self.lora_B(self.lora_A(self.pool(self.dropout(x)).to(a.dtype)))  # (..., G) -> (..., r) -> (..., d)
        return out + (self.scaling * update).to(out.dtype)

    def group_delta(self) -> torch.Tensor:
        """ΔW per (output, group): (α/r)(BA)/L, shape (d, G); each value applies to all L inputs of its group."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight) / self.group_size  # (d, r) @ (r, G)

    def merge(self) -> None:
        """Fold the adapter into the zero points, z' = z − ΔW / s; codes and scales stay as they are."""
        if self.merged:
            return
        with torch.no_grad():
            self._premerge_zero = self.base.zero.clone()
            self.base.zero -= self.group_delta().float() / self.base.scale.float()  # (d, G)
        self.merged = True

    def unmerge(self) -> None:
        """Restore the exact pre-merge zero points."""
        if not self.merged:
            return
        with torch.no_grad():
            self.base.zero.copy_(self._premerge_zero)
        self._premerge_zero, self.merged = None, False


def apply_qa_lora(model: nn.Module, cfg: QALoraConfig = QALoraConfig(), progress: bool = False) -> nn.Module:
    """Group-quantize every target linear (RTN, ``cfg.bits``) and add a QA-LoRA adapter; freeze the rest.

    Every layer is built before the first one is swapped in, so a failure leaves the model as it was.
    """
    cfg = config_or_default(cfg, QALoraConfig, "QALoraConfig(r=8, group_size=32)")
    targets = linear_targets(model, targets_or_default(model, cfg.target_modules, "linears"), "QA-LoRA")
    for name, layer in targets.items():  # check every layer before changing any
        if layer.in_features % cfg.group_size:
            raise ValueError(f"group_size={cfg.group_size} does not divide in_features={layer.in_features} "
                             f"of {name}; pick a divisor such as 32 or 64")
        groups = layer.in_features // cfg.group_size
        if cfg.r > min(groups, layer.out_features):
            raise ValueError(f"r={cfg.r} exceeds min(groups, out_features) = {min(groups, layer.out_features)} "
                             f"of {name} ({groups} groups of {cfg.group_size} inputs); pick a smaller r or "
                             "group_size")
    layers = progress_bar(targets.items(), desc="QA-LoRA", unit="layer", disable=not progress)
    adapted = {name: QALoraLinear(GroupQuantLinear(layer, cfg.bits, cfg.group_size), cfg.r, cfg.alpha, cfg.dropout)
               for name, layer in layers}
    freeze_base(model)  # before the swap: the new adapters stay trainable
    replace_all(model, adapted)
    return model


def merge_qa_lora(model: nn.Module) -> nn.Module:
    """Merge every QA-LoRA adapter into its quantized base (the model stays b-bit group-quantized)."""
    layers = [m for m in model.modules() if isinstance(m, QALoraLinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no QA-LoRA layers; call apply_qa_lora first")
    for layer in layers:
        layer.merge()
    return model
