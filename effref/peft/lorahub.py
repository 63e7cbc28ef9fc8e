"""LoraHub: compose several trained LoRA modules for an unseen task with a gradient-free search of weights.

Paper: Huang, Liu, Lin, Pang, Du, Lin (2024), "LoraHub: Efficient Cross-Task Generalization via Dynamic
LoRA Composition", arXiv:2307.13269 — §3 (Eqs. 1–3: COMPOSE and ADAPT).
Implements: given N LoRA modules m_i = (A_i, B_i) trained on upstream tasks, the composed module is
  m̂ = (w₁A₁ + … + w_NA_N, w₁B₁ + … + w_NB_N)  (Eq. 2: A and B are mixed separately, with the same weights),
so ΔW = (α/r)(Σ w_i B_i)(Σ w_i A_i); the weights are found from a few examples of the new task by
minimising  L(w) + λ Σ|w_i|  (Eq. 3: task loss plus an L1 penalty) with a derivative-free optimiser —
only forward passes, no gradients, no optimizer state. The paper uses CMA-ES (Shiwa, from Nevergrad); here
SciPy's Nelder–Mead simplex, started at w = 1/N with an initial step of ``step`` per weight and clipped to
``bounds``.
Glossary: N modules · w ``weights`` · λ ``l1`` · L the loss callable on the few-shot examples.
Left out: CMA-ES itself (any scipy.optimize derivative-free method can be passed as ``method``), the
          paper's pool of ~200 FLAN-T5 modules and its random choice of 20 of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from effref.checks import config_or_default
from effref.peft.lora import load_lora_state_dict, lora_state_dict


@dataclass
class LoraHubConfig:
    max_evals: int = 40  # forward evaluations of L(w) + λ‖w‖₁
    l1: float = 0.05
    step: float = 0.5  # initial simplex size
    bounds: tuple[float, float] = (-1.5, 1.5)
    method: str = "Nelder-Mead"

    def __post_init__(self) -> None:
        if self.max_evals < 1 or self.l1 < 0 or self.bounds[0] >= self.bounds[1]:
            raise ValueError(f"max_evals={self.max_evals}, l1={self.l1}, bounds={self.bounds}: need max_evals >= 1, "
                             "l1 >= 0 and bounds=(low, high) with low < high")


@dataclass
class LoraHubResult:
    weights: list[float]
    objective: float  # L(w) + λ‖w‖₁ at the best weights
    history: list[float] = field(default_factory=list)  # objective of every evaluation, in order


def compose_lora(modules: list[dict[str, torch.Tensor]], weights) -> dict[str, torch.Tensor]:
    """Eq. 2: the element-wise weighted sum of N LoRA state dicts (same keys and shapes)."""
    if not modules:
        raise ValueError("modules is empty; pass the lora_state_dict of at least one trained module")
    if len(weights) != len(modules):
        raise ValueError(f"got {len(weights)} weights for {len(modules)} modules; pass one weight per module")
    keys = set(modules[0])
    for i, m in enumerate(modules[1:], start=1):
        if set(m) != keys or any(m[k].shape != modules[0][k].shape for k in keys):
            raise ValueError(f"module {i} has other keys or shapes than module 0; all modules must come from "
                             "apply_lora with the same target_modules and rank")
    return {k: sum(float(w) * m[k] for w, m in zip(weights, modules)) for k in modules[0]}


@torch.no_grad()
def lorahub_search(model: nn.Module, modules: list[dict[str, torch.Tensor]], loss_fn: Callable[[nn.Module], float],
                   cfg: LoraHubConfig | None = None) -> LoraHubResult:
    """Find weights w for ``compose_lora`` that minimise ``loss_fn(model) + l1·‖w‖₁``; load the best into ``model``.

    ``model`` must already carry LoRA layers of the modules' shape (``apply_lora``); ``loss_fn`` evaluates
    the model on the few examples of the new task and returns a float. If the search fails, the model's LoRA
    matrices are put back as they were.
    """
    from scipy.optimize import minimize

    cfg = config_or_default(cfg, LoraHubConfig, "LoraHubConfig()")
    before = lora_state_dict(model)  # raises if the model has no LoRA layers; restored if the search fails
    n = len(modules)
    history: list[float] = []
    low, high = cfg.bounds

    def objective(w: np.ndarray) -> float:
        w = np.clip(w, low, high)
        load_lora_state_dict(model, compose_lora(modules, w))
        value = float(loss_fn(model)) + cfg.l1 * float(np.abs(w).sum())  # Eq. 3
        history.append(value)
        return value

    start = np.full(n, 1.0 / n)
    options = {"maxfev": cfg.max_evals}
    if cfg.method == "Nelder-Mead":
        options["initial_simplex"] = np.vstack([start, start + cfg.step * np.eye(n)])
    try:
        result = minimize(objective, start, method=cfg.method, options=options)
        best = np.clip(result.x, low, high)
        load_lora_state_dict(model, compose_lora(modules, best))
        return LoraHubResult(weights=best.tolist(), objective=float(objective(best)), history=history)
    except BaseException:  # a loss_fn that fails mid-search must not leave a half-searched mixture loaded
        load_lora_state_dict(model, before)
        raise
