"""LOMO: LOw-Memory Optimization, the SGD update fused into the backward pass.

Paper: Lv, Yang, Liu, Gao, Guo, Qiu (2023), "Full Parameter Fine-tuning for Large Language Models with Limited
Resources", arXiv:2306.09782 — §3.2 (fused update), Algorithm 1.
Implements: plain SGD, θ ← θ − η·(g + λθ), applied to each parameter the moment its gradient is complete
during ``loss.backward()``, after which the gradient is dropped. A post-accumulate-grad hook on every
trainable parameter does the work, so at any time at most the gradients of the parameters whose backward is
in flight are alive (not all of them, as with ``optimizer.step()`` after backward), and there is no
optimizer state at all (SGD without momentum has none). A parameter used twice (tied embeddings) receives its
hook once, after both contributions are summed, so the update equals SGD's on the same gradient.
Glossary: θ parameter · g its gradient · η ``lr`` · λ ``weight_decay`` · c ``clip_value`` (element-wise
          clipping; the paper's other option, clipping by the global norm, needs a second backward pass).
Left out: global-norm clipping (two backward passes), dynamic loss scaling for fp16, the paper's
          DeepSpeed/ZeRO-3 integration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LomoConfig:
    lr: float = 1e-3  # η
    weight_decay: float = 0.0  # λ, added to the gradient as in torch.optim.SGD
    clip_value: float | None = None  # clamp every gradient element to [-c, c] before the update

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.clip_value is not None and not self.clip_value > 0:
            raise ValueError(f"clip_value={self.clip_value} must be > 0, or None for no clipping")


class Lomo:
    """Fuse SGD into backward for every trainable parameter of ``model``; ``remove()`` undoes it.

    After ``Lomo(model, cfg)``, each ``loss.backward()`` is a complete training step. The object also has the
    two methods of an optimizer a training loop calls, ``zero_grad`` and ``step``, both no-ops, so it can stand
    in for one. ``updates`` counts parameter updates (one per trainable parameter per backward).
    """

    def __init__(self, model: nn.Module, cfg: LomoConfig = LomoConfig()) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        params = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))  # each tied tensor once
        if not params:
            raise ValueError("model has no trainable parameters; LOMO updates those with requires_grad=True")
        self.cfg = cfg
        self.updates = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._update) for p in params]

    @torch.no_grad()
    def _update(self, p: torch.Tensor) -> None:
        grad = p.grad
        if self.cfg.clip_value is not None:
            grad = grad.clamp(-self.cfg.clip_value, self.cfg.clip_value)
        if self.cfg.weight_decay:
            grad = grad.add(p, alpha=self.cfg.weight_decay)  # g + λθ, as torch.optim.SGD does
        p.add_(grad, alpha=-self.cfg.lr)  # θ ← θ − η·g, in place, while backward goes on
        p.grad = None  # the gradient is freed now, not after the whole backward
        self.updates += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: LOMO never leaves a gradient behind."""

    def step(self) -> None:
        """Nothing to do: the update already happened inside ``backward``."""

    def remove(self) -> None:
        """Detach the hooks; the model trains normally again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
