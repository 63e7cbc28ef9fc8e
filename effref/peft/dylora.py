"""DyLoRA: one LoRA trained for a whole range of ranks at once, by sampling the rank at every step.

Paper: Valipour, Rezagholizadeh, Kobyzev, Ghodsi (2023), "DyLoRA: Parameter-Efficient Tuning of
Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation", arXiv:2210.07558 — §3, Eqs. 1–4.
Implements: A ∈ ℝ^{r_max×k}, B ∈ ℝ^{d×r_max}; each training step draws b ~ p_B = Uniform{r_min … r_max}
(one b for the whole model) and computes h = W₀x + (α/b)·B[:, :b] A[:b] x  (Eq. 3: the truncated
matrices W_up↓b, W_dw↓b), so the first b rows of A and columns of B learn to work on their own for every b.
After training any rank b in the range is usable with ``set_rank`` — no search, no retraining.
Glossary: b ``active_rank`` · r_max ``r`` · W_dw↓b ``lora_A.weight[:b]`` · W_up↓b ``lora_B.weight[:, :b]``
          · p_B the rank distribution (uniform).
Left out: the "frozen" variant that updates only the b-th row/column each step (here all of the first b
          train, the paper's non-frozen mode); the paper's per-task hyper-parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from effref.checks import config_or_default
from effref.peft.core import adapters_of, targets_or_default, wrap_modules
from effref.peft.lora import LoraLinear


@dataclass
class DyLoraConfig:
    r: int = 8  # r_max
    r_min: int = 1
    alpha: float = 16
    target_modules: tuple[str, ...] | None = None  # None: the model's query and value projections

    def __post_init__(self) -> None:
        if not 0 < self.r_min <= self.r:
            raise ValueError(f"r_min={self.r_min}, r={self.r}: need 0 < r_min <= r (the largest rank)")
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)


class DyLoraLinear(LoraLinear):
    """A LoRA layer that uses only its first ``active_rank`` components, scaled by α / active_rank."""

    def __init__(self, base: nn.Module, r: int, alpha: float):
        super().__init__(base, r, alpha)
        self.active_rank = r

    def delta_weight(self) -> torch.Tensor:
        b = self.active_rank
        return (self.alpha / b) * self.lora_B.weight[:, :b] @ self.lora_A.weight[:b]  # (d, b) @ (b, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        b = self.active_rank
        h = x.to(self.lora_A.weight.dtype) @ self.lora_A.weight[:b].T  # (..., b): W_dw↓b x
        return out + ((self.alpha / b) * h @ self.lora_B.weight[:, :b].T).to(out.dtype)  # Eq. 3

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight().to(weight.dtype)


def apply_dylora(model: nn.Module, cfg: DyLoraConfig) -> nn.Module:
    """Wrap the target linears in ``DyLoraLinear`` (rank r_max) and freeze everything else (in place)."""
    cfg = config_or_default(cfg, DyLoraConfig, "DyLoraConfig(r=8)")
    targets = targets_or_default(model, cfg.target_modules, "query_value")
    wrap_modules(model, targets, lambda name, layer: DyLoraLinear(layer, cfg.r, cfg.alpha), skip=(LoraLinear,))
    model.dylora_range = (cfg.r_min, cfg.r)
    return model


def set_rank(model: nn.Module, rank: int) -> None:
    """Use the first ``rank`` components in every DyLoRA layer (any rank in [r_min, r_max])."""
    layers = adapters_of(model, DyLoraLinear)
    r_min, r_max = getattr(model, "dylora_range", (1, min(m.r for m in layers.values())))
    if not r_min <= rank <= r_max:
        raise ValueError(f"rank={rank} is outside the trained range [{r_min}, {r_max}]; pick a rank in it")
    if any(m.merged for m in layers.values()):
        raise RuntimeError("the DyLoRA layers are merged at one rank; unmerge before changing the rank")
    for layer in layers.values():
        layer.active_rank = rank


def sample_rank(model: nn.Module, generator: torch.Generator | None = None) -> int:
    """Draw b ~ Uniform{r_min … r_max} and set it everywhere (call before each training step)."""
    r_min, r_max = model.dylora_range
    rank = int(torch.randint(r_min, r_max + 1, (1,), generator=generator))
    set_rank(model, rank)
    return rank
