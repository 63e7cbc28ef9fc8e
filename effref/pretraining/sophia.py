"""Sophia: a clipped second-order optimizer with a cheap diagonal Hessian estimate, refreshed every k steps.

Paper: Liu, Li, Hall, Liang, Ma (2024), "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training", ICLR, arXiv:2305.14342 — Algorithm 3 (Sophia), Algorithm 1 (Hutchinson), Algorithm 2 (GNB).
Implements, per parameter θ with gradient g at step t:
    m ← β₁·m + (1 − β₁)·g                                  EMA of gradients
    every k steps:  h ← β₂·h + (1 − β₂)·ĥ                  EMA of a diagonal Hessian estimate ĥ
    θ ← θ − η·λ·θ                                          decoupled weight decay
    θ ← θ − η·clip(m / max(γ·h, ε), 1)                     clip(z, 1) = max(min(z, 1), −1), elementwise
Estimators of diag(∇²L):
    Hutchinson    ĥ = u ⊙ (∇²L·u),  u ~ N(0, I)                       unbiased; needs a Hessian-vector product
    GNB           ŷ ~ softmax(f(θ, x)),  ĥ = B · ∇L̂ ⊙ ∇L̂,  L̂ = (1/B) Σ CE(f(θ, xᵢ), ŷᵢ)
                  the Gauss-Newton diagonal in expectation (Bartlett's identity), from one ordinary backward
Where the curvature is large the step is m/(γh), Newton-like; where h is tiny or negative the clip caps the step
at η, so no coordinate ever moves by more than η (besides weight decay). State: m and h, 8 bytes per parameter.
Glossary: η ``lr`` · β₁, β₂ ``betas`` (paper 0.96, 0.99) · γ ``gamma`` · ε ``eps`` (paper 1e-12) · k
          ``hessian_every`` (paper 10) · λ ``weight_decay`` · B the rows (tokens) behind ĥ.
Left out: the official code's folding of B into γ (``rho · bs``), JAX/levanter sharding, the per-step
          "hit rate" logging of clipped coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from effref.checks import config_or_default
from effref.pretraining.state import check_beta, check_lr, check_weight_decay

ESTIMATORS = ("gnb", "hutchinson")


@dataclass(frozen=True)
class SophiaConfig:
    lr: float = 1e-4  # η: the largest step any coordinate takes
    betas: tuple[float, float] = (0.96, 0.99)  # β₁ (gradient EMA), β₂ (Hessian EMA)
    gamma: float = 0.01  # γ
    eps: float = 1e-12  # ε
    weight_decay: float = 0.1  # λ
    hessian_every: int = 10  # k
    estimator: str = "gnb"  # "gnb" (Sophia-G) or "hutchinson" (Sophia-H)

    def __post_init__(self) -> None:
        check_lr(self.lr)
        if len(self.betas) != 2:
            raise ValueError(f"betas={self.betas!r} must be a pair (β₁, β₂), e.g. (0.96, 0.99)")
        check_beta("betas[0]", self.betas[0])
        check_beta("betas[1]", self.betas[1])
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma={self.gamma!r} must be a finite number > 0 (γ scales the Hessian in the "
                             "denominator); the official code uses 0.01-0.05")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps={self.eps!r} must be > 0 (it floors γ·h so the ratio stays finite); use 1e-12")
        check_weight_decay(self.weight_decay)
        if isinstance(self.hessian_every, bool) or not isinstance(self.hessian_every, int) \
                or self.hessian_every < 1:
            raise ValueError(f"hessian_every={self.hessian_every!r} must be an integer ≥ 1 (k, steps between "
                             "Hessian estimates; the paper uses 10)")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator={self.estimator!r} is not known; use one of {ESTIMATORS}")


def hutchinson_hessian(loss: torch.Tensor, params: Sequence[torch.Tensor],
                       generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Hutchinson's ĥ = u ⊙ (∇²L·u) for each of ``params`` (Algorithm 1); ``loss`` must still have its graph."""
    grads = torch.autograd.grad(loss, params, create_graph=True)
    us = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]  # u ~ N(0, I)
    hvps = torch.autograd.grad(grads, params, grad_outputs=us)  # ∇²L·u, a Hessian-vector product per tensor
    return [u * hv for u, hv in zip(us, hvps)]


def gnb_hessian(logits: torch.Tensor, params: Sequence[torch.Tensor],
                generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Gauss-Newton-Bartlett ĥ = B·∇L̂⊙∇L̂ with labels ŷ sampled from the model's own softmax (Algorithm 2).

    ``logits`` (…, V) must still have their graph; every row is one of the B examples (tokens).
    """
    flat = logits.reshape(-1, logits.shape[-1]).float()  # (B, V)
    with torch.no_grad():
        sampled = torch.multinomial(flat.softmax(-1).cpu(), 1, generator=generator).squeeze(-1)  # (B,) ŷ
    loss = F.cross_entropy(flat, sampled.to(flat.device))  # L̂, the mean over the B rows
    grads = torch.autograd.grad(loss, params)
    return [flat.shape[0] * g * g for g in grads]  # B · ∇L̂ ⊙ ∇L̂


class Sophia(torch.optim.Optimizer):
    """Sophia (Algorithm 3). Call ``refresh_hessian`` every ``cfg.hessian_every`` steps, ``step`` every step."""

    def __init__(self, params, cfg: SophiaConfig | None = None) -> None:
        cfg = config_or_default(cfg, SophiaConfig, "SophiaConfig(lr=1e-4, gamma=0.01)")
        super().__init__(params, dict(lr=cfg.lr, betas=cfg.betas, gamma=cfg.gamma, eps=cfg.eps,
                                      weight_decay=cfg.weight_decay))
        self.cfg = cfg
        self.hessian_updates = 0

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # m
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # h
        return state

    @torch.no_grad()
    def update_hessian(self, estimates: Sequence[torch.Tensor]) -> None:
        """h ← β₂·h + (1 − β₂)·ĥ, with ``estimates`` in the order of the optimizer's parameters."""
        params = self._params()
        if len(estimates) != len(params):
            raise ValueError(f"got {len(estimates)} Hessian estimates for {len(params)} parameters; estimate "
                             "with the optimizer's own parameters, in their order")
        estimate = iter(estimates)
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                h_hat = next(estimate)
                if h_hat.shape != p.shape:
                    raise ValueError(f"a Hessian estimate of shape {tuple(h_hat.shape)} for a parameter of shape "
                                     f"{tuple(p.shape)}")
                self._state(p)["hessian"].lerp_(h_hat.to(p.dtype), 1 - beta2)  # β₂h + (1 − β₂)ĥ
        self.hessian_updates += 1

    def refresh_hessian(self, logits: torch.Tensor, targets: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> None:
        """Estimate ĥ from a fresh forward's ``logits`` (with graph) by ``cfg.estimator`` and update h.

        GNB needs only the logits; Hutchinson differentiates the true loss CE(logits, ``targets``) twice.
        """
        params = self._params()
        if self.cfg.estimator == "gnb":
            estimates = gnb_hessian(logits, params, generator)
        else:
            if targets is None:
                raise ValueError("estimator='hutchinson' needs the targets of the loss; pass targets=")
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
            estimates = hutchinson_hessian(loss, params, generator)
        self.update_hessian(estimates)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta1, gamma, eps, wd = group["lr"], group["betas"][0], group["gamma"], group["eps"], \
                group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                m, h = state["exp_avg"], state["hessian"]
                m.lerp_(p.grad, 1 - beta1)  # m ← β₁m + (1 − β₁)g
                p.mul_(1 - lr * wd)  # θ ← θ − ηλθ
                ratio = (m / (gamma * h).clamp(min=eps)).clamp_(-1, 1)  # clip(m / max(γh, ε), 1)
                p.add_(ratio, alpha=-lr)  # θ ← θ − η·clip(…)
        return loss
