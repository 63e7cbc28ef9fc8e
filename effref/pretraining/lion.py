"""Lion: EvoLved Sign Momentum, the optimizer found by program search, with one moment instead of two.

Paper: Chen, Liang, Huang, Real, Wang, Pham, Dong, Luong, Hsieh, Lu, Le (2023), "Symbolic Discovery of
Optimization Algorithms", NeurIPS, arXiv:2302.06675 — Algorithm 2 (Lion with decoupled weight decay).
Implements, per parameter θ with gradient g:
    c ← β₁·m + (1 − β₁)·g                 interpolate momentum and gradient
    θ ← θ − η·(sign(c) + λ·θ)             every coordinate moves by exactly η (plus weight decay)
    m ← β₂·m + (1 − β₂)·g                 the momentum is updated after, with a different β
The sign makes the update's norm large (√d·η for d coordinates), so Lion wants an η 3–10× smaller than AdamW's
and a λ 3–10× larger (§3 of the paper) to keep η·λ the same. State: m only, 4 bytes per fp32 parameter.
Glossary: η ``lr`` · β₁, β₂ ``betas`` (defaults 0.9, 0.99) · λ ``weight_decay`` · c the update direction.
Left out: the Triton/fused kernels, the paper's learning-rate schedules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effref.checks import config_or_default
from effref.pretraining.state import check_beta, check_lr, check_weight_decay


@dataclass(frozen=True)
class LionConfig:
    lr: float = 1e-4  # η, 3-10x below AdamW's
    betas: tuple[float, float] = (0.9, 0.99)  # β₁ (update direction), β₂ (momentum)
    weight_decay: float = 0.0  # λ, 3-10x above AdamW's when used

    def __post_init__(self) -> None:
        check_lr(self.lr)
        if len(self.betas) != 2:
            raise ValueError(f"betas={self.betas!r} must be a pair (β₁, β₂), e.g. (0.9, 0.99)")
        check_beta("betas[0]", self.betas[0])
        check_beta("betas[1]", self.betas[1])
        check_weight_decay(self.weight_decay)


class Lion(torch.optim.Optimizer):
    """Lion (Algorithm 2): the sign of an interpolated momentum, with decoupled weight decay."""

    def __init__(self, params, cfg: LionConfig | None = None) -> None:
        cfg = config_or_default(cfg, LionConfig, "LionConfig(lr=1e-4, weight_decay=1.0)")
        super().__init__(params, dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay))
        self.cfg = cfg

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # m
                m = state["exp_avg"]
                c = m.lerp(g, 1 - beta1)  # c = β₁m + (1 − β₁)g
                p.mul_(1 - lr * wd)  # θ ← θ − ηλθ
                p.add_(c.sign_(), alpha=-lr)  # θ ← θ − η·sign(c)
                m.lerp_(g, 1 - beta2)  # m ← β₂m + (1 − β₂)g
        return loss
