"""MeZO: fine-tuning with forward passes only (zeroth-order SGD with seed-regenerated perturbations).

Paper: Malladi, Gao, Nichani, Damian, Lee, Chen, Arora (2023), "Fine-Tuning Language Models with Just Forward
Passes", arXiv:2305.17333 — Algorithm 1 (MeZO), Definition 1 (SPSA).
Implements: the two-point SPSA estimate of the gradient along one random direction z ~ N(0, I_d),

    ĝ = (L(θ + εz) − L(θ − εz)) / (2ε) · z,          (Definition 1)

and the in-place update θ ← θ − η·ĝ, done the memory-free MeZO way: z is never stored. One integer seed
regenerates the same z, parameter by parameter, four times per step (perturb +εz, perturb −2εz, restore +εz,
update −η·p·z), so the memory is that of inference plus one parameter-sized noise tensor at a time. For a
quadratic loss the central difference is exact, ĝ = (zᵀ∇L) z, and E[z zᵀ] = I makes ĝ an unbiased gradient
estimate (tests/peft/test_mezo.py checks this statistically).
Glossary: θ trainable parameters · z random direction (same shape as θ) · ε ``eps`` · η ``lr``
          · p = projected_grad, the scalar (L₊ − L₋)/(2ε) · s ``seed`` of the step.
Left out: n > 1 directions per step, the prefix/LoRA variants (MeZO works on any set of trainable parameters:
          freeze the others first), non-differentiable objectives, the paper's learning-rate schedules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from effref.runtime import progress_bar


@dataclass(frozen=True)
class MezoConfig:
    lr: float = 1e-6  # η; the paper's grid for OPT is 1e-6 … 1e-7 (full parameters)
    eps: float = 1e-3  # ε, the perturbation scale (the paper uses 1e-3)
    weight_decay: float = 0.0  # decoupled from the estimate: θ ← θ − η·λ·θ, for parameters with ndim ≥ 2

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0; MeZO needs small rates such as 1e-6")
        if not self.eps > 0:
            raise ValueError(f"eps={self.eps} must be > 0; the paper uses eps=1e-3")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters; MeZO updates the parameters with "
                         "requires_grad=True, so unfreeze some (or apply LoRA) first")
    return params


def _add_direction(params: list[nn.Parameter], seed: int, scale: float) -> None:
    """θ ← θ + scale·z(seed): z is drawn again from the seed, one parameter at a time, never stored whole."""
    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    for p in params:
        z = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)  # same shape as p
        p.add_(z, alpha=scale)


@torch.no_grad()
def spsa_projected_gradient(model: nn.Module, loss_fn: Callable[[], torch.Tensor], eps: float,
                            seed: int) -> tuple[float, float]:
    """Return (p, loss): the projected gradient p = (L(θ+εz) − L(θ−εz))/(2ε) for z drawn from ``seed``.

    The parameters are moved to θ+εz, θ−εz and back to θ (up to float rounding; also when ``loss_fn`` raises).
    ``loss_fn()`` evaluates the loss of ``model`` on a fixed batch; it runs twice, without autograd. The second
    value returned is the mean of the two losses, an estimate of L(θ) for logging.
    """
    if not eps > 0:
        raise ValueError(f"eps={eps} must be > 0; the paper uses eps=1e-3")
    params = _trainable(model)
    _add_direction(params, seed, eps)  # θ + εz
    offset = eps  # where the parameters are now, in units of z
    try:
        loss_plus = float(loss_fn())
        _add_direction(params, seed, -2 * eps)  # θ − εz
        offset = -eps
        loss_minus = float(loss_fn())
    finally:
        _add_direction(params, seed, -offset)  # back to θ (up to rounding), also when loss_fn raised
    return (loss_plus - loss_minus) / (2 * eps), (loss_plus + loss_minus) / 2


@torch.no_grad()
def mezo_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor], cfg: MezoConfig, seed: int) -> float:
    """One MeZO step (Algorithm 1) on the trainable parameters of ``model``; returns the logged loss.

    ``loss_fn`` must return the loss of the current parameters on the SAME batch both times it is called
    within this step. ``seed`` picks z; use a fresh one each step (e.g. the step index plus an offset).
    """
    projected_grad, loss = spsa_projected_gradient(model, loss_fn, cfg.eps, seed)
    params = _trainable(model)
    if cfg.weight_decay:
        for p in params:
            if p.ndim >= 2:
                p.mul_(1 - cfg.lr * cfg.weight_decay)
    _add_direction(params, seed, -cfg.lr * projected_grad)  # θ ← θ − η·p·z, z regenerated once more
    return loss


def mezo_train(model: nn.Module, batch_loss: Callable[[int], torch.Tensor], steps: int, cfg: MezoConfig,
               seed: int = 0, progress: bool = True) -> list[float]:
    """Run ``steps`` MeZO steps; ``batch_loss(step)`` returns the loss of the model on that step's batch.

    Returns the per-step losses (the mean of L₊ and L₋). Step ``t`` uses the direction seed ``seed + t``.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    losses = []
    for step in progress_bar(range(steps), desc="MeZO", unit="step", disable=not progress):
        losses.append(mezo_step(model, lambda step=step: batch_loss(step), cfg, seed=seed + step))
    return losses


def mezo_update(cfg: MezoConfig, seed: int = 0) -> Callable[[nn.Module, Callable[[], torch.Tensor], int], float]:
    """MeZO as the update rule of ``effref.finetune.train(..., update=mezo_update(cfg))``: step t uses seed + t.

    The shared loop then draws the batches and measures time and memory exactly as for the backpropagation
    methods; ``train``'s ``lr`` is not used (η is ``cfg.lr``).
    """
    return lambda model, loss_fn, step: mezo_step(model, loss_fn, cfg, seed=seed + step)
