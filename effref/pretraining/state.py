"""What training keeps in memory per parameter, counted from the live tensors, and the optimizers' shared checks.

The machinery the pre-training modules share (as ``effref/compression/calibration.py`` serves compression):
``optimizer_state_bytes`` sums the tensors an optimizer really holds in ``optimizer.state``, and
``training_bytes`` adds the weights, the gradients and an fp32 master copy when there is one, so that a table of
"bytes per parameter" is measured rather than recited. The reference numbers (ZeRO, Rajbhandari et al. 2020,
§3.1, for Ψ parameters): Adam keeps m and v, 8Ψ bytes in fp32; mixed-precision Adam keeps fp16 weights and
gradients (2Ψ + 2Ψ) and fp32 master weights, m and v (K·Ψ = 12Ψ): 16Ψ bytes in all — as many as plain fp32
Adam (4Ψ weights + 4Ψ gradients + 8Ψ state).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


def check_lr(lr: float) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} must be a finite number > 0 (the learning rate η)")


def check_beta(name: str, beta: float) -> None:
    if not (isinstance(beta, (int, float)) and 0 <= beta < 1):
        raise ValueError(f"{name}={beta!r} must be in [0, 1) (an exponential moving-average decay, e.g. 0.9)")


def check_weight_decay(weight_decay: float) -> None:
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay={weight_decay!r} must be a finite number ≥ 0 (λ; 0 turns it off)")


def _distinct(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.dtype)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (moments, Hessian estimates, step counters), each once."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    tensors = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.nbytes for t in _distinct(tensors))


@dataclass(frozen=True)
class TrainingBytes:
    parameters: int  # trainable parameters Ψ, tied ones once
    weights: int  # bytes of the model's trainable parameters, in their dtype
    gradients: int  # bytes of their .grad tensors alive now (call after backward)
    master: int  # bytes of an fp32 master copy (mixed precision), 0 without one
    optimizer: int  # optimizer_state_bytes

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.master + self.optimizer

    def per_parameter(self) -> dict[str, float]:
        """Each part divided by Ψ: ZeRO's 2 + 2 + 12 = 16 for mixed-precision Adam."""
        parts = ("weights", "gradients", "master", "optimizer", "total")
        return {k: getattr(self, k) / self.parameters for k in parts}


def training_bytes(model: nn.Module, optimizer: torch.optim.Optimizer,
                   master: Iterable[torch.Tensor] | None = None) -> TrainingBytes:
    """Measure the persistent training state of ``model``: weights, gradients, ``master`` copy, optimizer state.

    Call it after ``backward`` (gradients alive) and after at least one ``optimizer.step()`` (state allocated).
    Activations and temporaries are not included: they depend on the batch, not on Ψ.
    """
    params = _distinct(p for p in model.parameters() if p.requires_grad)
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    grads = [p.grad for p in params if p.grad is not None]
    return TrainingBytes(sum(p.numel() for p in params), sum(p.nbytes for p in params), sum(g.nbytes for g in grads),
                         sum(m.nbytes for m in _distinct(master or [])), optimizer_state_bytes(optimizer))
