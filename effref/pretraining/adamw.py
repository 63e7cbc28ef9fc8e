"""AdamW: Adam with decoupled weight decay, the baseline optimizer of LLM pre-training and its memory bill.

Paper: Loshchilov & Hutter (2019), "Decoupled Weight Decay Regularization", ICLR, arXiv:1711.05101 —
Algorithm 2; Adam: Kingma & Ba (2015), arXiv:1412.6980 — Algorithm 1.
Implements, per parameter θ with gradient g at step t (the order of ``torch.optim.AdamW``):
    θ ← θ − η·λ·θ                                     decoupled weight decay (not added to g)
    m ← β₁·m + (1 − β₁)·g                             first moment
    v ← β₂·v + (1 − β₂)·g²                            second moment
    θ ← θ − (η / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)   bias-corrected step
State: m and v, each a tensor like θ: 8 bytes per fp32 parameter, the "optimizer state" term that Lion halves
and that ZeRO shards.
Glossary: η ``lr`` · β₁, β₂ ``betas`` · ε ``eps`` · λ ``weight_decay`` · t the step count of the parameter.
Left out: amsgrad, foreach/fused multi-tensor kernels, ``maximize``, complex parameters, sparse gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from effref.checks import config_or_default
from effref.pretraining.state import check_beta, check_lr, check_weight_decay


@dataclass(frozen=True)
class AdamWConfig:
    lr: float = 1e-3  # η
    betas: tuple[float, float] = (0.9, 0.999)  # β₁, β₂ (LLM pre-training often uses β₂ = 0.95)
    eps: float = 1e-8  # ε
    weight_decay: float = 1e-2  # λ, torch.optim.AdamW's default

    def __post_init__(self) -> None:
        check_lr(self.lr)
        if len(self.betas) != 2:
            raise ValueError(f"betas={self.betas!r} must be a pair (β₁, β₂), e.g. (0.9, 0.999)")
        check_beta("betas[0]", self.betas[0])
        check_beta("betas[1]", self.betas[1])
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps={self.eps!r} must be a finite number > 0 (it keeps m / √v finite); use 1e-8")
        check_weight_decay(self.weight_decay)


class AdamW(torch.optim.Optimizer):
    """AdamW written out step by step; equals ``torch.optim.AdamW(params, lr, betas, eps, weight_decay)``."""

    def __init__(self, params, cfg: AdamWConfig | None = None) -> None:
        cfg = config_or_default(cfg, AdamWConfig, "AdamWConfig(lr=1e-3)")
        super().__init__(params, dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay))
        self.cfg = cfg

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # m
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # v
                    state["t"] = 0  # a Python int: no tensor bytes
                state["t"] += 1
                t, m, v = state["t"], state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1 - lr * wd)  # θ ← θ − ηλθ
                m.lerp_(g, 1 - beta1)  # m ← β₁m + (1 − β₁)g
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v ← β₂v + (1 − β₂)g²
                step_size = lr / (1 - beta1 ** t)  # η / (1 − β₁ᵗ)
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)  # √v̂ + ε
                p.addcdiv_(m, denom, value=-step_size)  # θ ← θ − η m̂ / (√v̂ + ε)
        return loss
