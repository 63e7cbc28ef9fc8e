"""A small pre-training loop that every optimizer and precision of this area runs through, so curves compare.

Next-token training from scratch on random windows of a token stream, with linear warm-up and cosine decay, global
gradient-norm clipping, and the two things this area adds to a plain loop: a :class:`MixedPrecision` trainer
(16-bit model, fp32 master weights, loss scaling and skipped steps) in place of an optimizer, and Sophia's Hessian
refresh every k steps (one extra forward and backward, counted in the time). ``state_bytes_after_step`` measures
what one configuration keeps per parameter, from the live tensors.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from effref.checks import config_or_default
from effref.pretraining.mixed_precision import MixedPrecision
from effref.pretraining.sophia import Sophia
from effref.pretraining.state import TrainingBytes, training_bytes
from effref.runtime import progress_bar


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 100
    batch_size: int = 16  # windows per step
    seq_len: int = 64  # tokens per window (the model sees seq_len, predicts seq_len targets)
    warmup_steps: int = 10  # linear warm-up of the learning rate from 0
    min_lr_ratio: float = 0.1  # cosine decay ends at this fraction of the peak learning rate
    max_grad_norm: float | None = 1.0  # global-norm clipping, None for none
    seed: int = 0  # draws the windows (and Sophia's sampled labels)
    micro_batches: int = 1  # k: backward of loss / k, one micro-batch's share of a k-times larger batch

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "micro_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer ≥ 1")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps}]")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1] (the final fraction of the peak lr)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be > 0, or None for no clipping")

    def lr_factor(self, step: int) -> float:
        """Warm-up then cosine: the multiplier of the peak learning rate at ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(self.steps - self.warmup_steps, 1)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class PretrainResult:
    losses: list[float] = field(default_factory=list)  # training loss of every step (before its update)
    scales: list[float] = field(default_factory=list)  # the loss scale S of every step (mixed precision)
    skipped: list[bool] = field(default_factory=list)  # steps dropped for inf/NaN gradients
    seconds: float = 0.0
    tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def windows(ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` random windows of ``seq_len + 1`` consecutive ids: (B, T + 1), inputs and shifted targets."""
    starts = torch.randint(0, len(ids) - seq_len, (batch_size,), generator=generator)  # (B,)
    return ids[starts[:, None] + torch.arange(seq_len + 1)]  # (B, T + 1)


def next_token_loss(model: nn.Module, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy in fp32, logits) of ``model`` predicting ``window[:, 1:]`` from ``window[:, :-1]``."""
    logits = model(window[:, :-1])  # (B, T, V)
    logits = logits if isinstance(logits, torch.Tensor) else logits.logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1)), logits


def _check(model: nn.Module, ids: torch.Tensor, trainer, cfg: PretrainConfig) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 1 or ids.is_floating_point():
        raise ValueError("ids must be a 1-D tensor of token ids; e.g. torch.tensor(list(text.encode()))")
    if len(ids) <= cfg.seq_len + 1:
        raise ValueError(f"ids holds {len(ids)} tokens, not more than seq_len + 1 = {cfg.seq_len + 1}; "
                         "use a longer text or a shorter seq_len")
    if not isinstance(trainer, (torch.optim.Optimizer, MixedPrecision)):
        raise TypeError(f"trainer must be a torch.optim.Optimizer or a MixedPrecision, got "
                        f"{type(trainer).__name__}")
    if isinstance(trainer, MixedPrecision):
        if trainer.model is not model:
            raise ValueError("the MixedPrecision trainer wraps another model; build it with this model")
        if isinstance(trainer.optimizer, Sophia):
            raise ValueError("Sophia inside MixedPrecision is not supported here: its Hessian estimate would be "
                             "taken on the 16-bit model; train Sophia in fp32 (pass the optimizer itself)")


def pretrain(model: nn.Module, ids: torch.Tensor, trainer: torch.optim.Optimizer | MixedPrecision,
             cfg: PretrainConfig | None = None, progress: bool = True, desc: str = "pre-training") -> PretrainResult:
    """Train ``model`` on random windows of ``ids`` for ``cfg.steps`` steps with ``trainer``; losses and scales.

    ``trainer`` is an optimizer over ``model``'s parameters (fp32 training; Sophia gets its Hessian refreshed every
    ``hessian_every`` steps) or a :class:`MixedPrecision` wrapping ``model``. The learning rate of every parameter
    group follows ``cfg.lr_factor`` times the group's ``lr`` at the call.

    With ``cfg.micro_batches = k > 1`` the backward runs on loss / k: exactly the backward of one micro-batch when
    k of them are accumulated into one step (every per-token gradient k times smaller, as in a k-times larger
    batch), and the update then uses that gradient alone. This shows in a small run what fp16 sees at large batch
    sizes; Adam-type updates see the smaller gradient only through ε.
    """
    cfg = config_or_default(cfg, PretrainConfig, "PretrainConfig(steps=100)")
    _check(model, ids, trainer, cfg)
    optimizer = trainer.optimizer if isinstance(trainer, MixedPrecision) else trainer
    peak = [group["lr"] for group in optimizer.param_groups]
    generator = torch.Generator().manual_seed(cfg.seed)
    device = next(model.parameters()).device
    result = PretrainResult()
    model.train()
    start = time.perf_counter()
    for step in progress_bar(range(cfg.steps), desc=desc, disable=not progress):
        for group, lr in zip(optimizer.param_groups, peak):
            group["lr"] = lr * cfg.lr_factor(step)
        window = windows(ids, cfg.batch_size, cfg.seq_len, generator).to(device)  # (B, T + 1)
        if isinstance(optimizer, Sophia) and step % optimizer.cfg.hessian_every == 0:
            _, logits = next_token_loss(model, window)  # a fresh graph for the estimator
            optimizer.refresh_hessian(logits, window[:, 1:], generator)
        loss, _ = next_token_loss(model, window)
        share = loss / cfg.micro_batches if cfg.micro_batches > 1 else loss
        if isinstance(trainer, MixedPrecision):
            trainer.backward(share)
            record = trainer.step(cfg.max_grad_norm)
            result.scales.append(record.scale)
            result.skipped.append(record.skipped)
        else:
            optimizer.zero_grad(set_to_none=True)
            share.backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
        result.losses.append(loss.item())
    result.seconds = time.perf_counter() - start
    result.tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    for group, lr in zip(optimizer.param_groups, peak):
        group["lr"] = lr
    model.eval()
    return result


def state_bytes_after_step(model: nn.Module, trainer: torch.optim.Optimizer | MixedPrecision,
                           window: torch.Tensor) -> TrainingBytes:
    """Take one training step on ``window`` (B, T + 1), then a second backward, and measure what is alive.

    After the step the optimizer state exists; after the second backward the gradients do. That is the
    moment ZeRO counts: weights + gradients + (master weights) + optimizer state.
    """
    if isinstance(trainer, MixedPrecision):
        for _ in range(32):  # a step skipped for overflow allocates no state: try again at the lower scale
            if trainer.optimizer.state:
                break
            trainer.backward(next_token_loss(model, window)[0])
            trainer.step()
        else:
            raise RuntimeError("32 steps in a row overflowed; lower the initial loss scale")
        trainer.backward(next_token_loss(model, window)[0])
        measured = training_bytes(model, trainer.optimizer, trainer.master)
    else:
        trainer.zero_grad(set_to_none=True)
        next_token_loss(model, window)[0].backward()
        trainer.step()
        trainer.zero_grad(set_to_none=True)
        next_token_loss(model, window)[0].backward()
        measured = training_bytes(model, trainer)
    for p in model.parameters():
        p.grad = None
    return measured
