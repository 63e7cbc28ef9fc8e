"""Mixed-precision training: FP16 with dynamic loss scaling and FP32 master weights, and the BF16 path.

Paper: Micikevicius, Narang, Alben, Diamos, Elsen, Garcia, Ginsburg, Houston, Kuchaiev, Venkatesh, Wu (2018),
"Mixed Precision Training", ICLR, arXiv:1710.03740 — §3.1 (FP32 master copy of weights), §3.2 (loss scaling),
§3.3 (FP32 accumulation); BF16: Kalamkar et al. (2019), arXiv:1905.12322.
Implements: the model computes in 16 bits; the optimizer updates an FP32 master copy θ₃₂ and the model gets a
rounded copy back after every step:
    forward/backward in fp16:   ∇ = ∂(S · L(θ₁₆)) / ∂θ₁₆            (the loss scaled by S before backward)
    unscale into fp32:          g = float32(∇) / S
    skip on overflow:           if any g is inf/NaN: no update, S ← S · b          (backoff, 0 < b < 1)
    otherwise:                  θ₃₂ ← Optimizer(θ₃₂, g);  θ₁₆ ← fp16(θ₃₂)
                                after N clean steps in a row: S ← S · γ           (growth, γ > 1)
This is the rule ``torch.amp.GradScaler`` follows (defaults S = 2¹⁶, γ = 2, b = ½, N = 2000). BF16 has FP32's
8-bit exponent, so gradients neither underflow nor overflow where FP32 would not: the BF16 path keeps the
master weights and drops the scaler. ``cast_report`` measures what a cast to a 16-bit format loses
(flushed to zero, kept only as a subnormal, overflowed to inf), the effect loss scaling exists to avoid.
Glossary: S ``scale`` · γ ``growth_factor`` · b ``backoff_factor`` · N ``growth_interval`` · θ₃₂ ``master``
          (fp32 parameters the optimizer owns) · θ₁₆ the model's own parameters (fp16 or bf16).
Left out: autocast's per-operation precision lists (here the whole model is cast; losses and softmax statistics
          are computed from fp32 logits by the caller), FP32 accumulation inside matmuls (the hardware's job),
          fused multi-tensor kernels, and the FSDP/ZeRO sharding of master weights and optimizer state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from effref.checks import config_or_default

LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LossScalerConfig:
    init_scale: float = 2.0 ** 16  # S at the first step
    growth_factor: float = 2.0  # γ: S ← γ·S after growth_interval clean steps
    backoff_factor: float = 0.5  # b: S ← b·S after a step with inf/NaN gradients
    growth_interval: int = 2000  # N

    def __post_init__(self) -> None:
        if not (math.isfinite(self.init_scale) and self.init_scale > 0):
            raise ValueError(f"init_scale={self.init_scale} must be a finite number > 0 (the loss scale S; "
                             "the paper starts at 2**16 as GradScaler does)")
        if not (math.isfinite(self.growth_factor) and self.growth_factor > 1):
            raise ValueError(f"growth_factor={self.growth_factor} must be > 1 (S grows after clean steps); use 2.0")
        if not 0 < self.backoff_factor < 1:
            raise ValueError(f"backoff_factor={self.backoff_factor} must be in (0, 1) (S shrinks after an "
                             "overflow); use 0.5")
        if isinstance(self.growth_interval, bool) or not isinstance(self.growth_interval, int) \
                or self.growth_interval < 1:
            raise ValueError(f"growth_interval={self.growth_interval!r} must be an integer ≥ 1 (clean steps "
                             "before S grows); GradScaler uses 2000")


class DynamicLossScaler:
    """Dynamic loss scaling with ``torch.amp.GradScaler``'s calls: ``scale``, ``unscale_``, ``step``, ``update``.

    The optimizer it steps must own fp32 parameters (the master copy): unscaling 16-bit gradients in 16 bits
    would underflow them again, which is why GradScaler refuses them too. ``found_inf`` tells whether the last
    step was skipped; ``history`` lists (scale, skipped) for every ``update``.
    """

    def __init__(self, cfg: LossScalerConfig | None = None) -> None:
        self.cfg = config_or_default(cfg, LossScalerConfig, "LossScalerConfig(init_scale=2.0**16)")
        self._scale = float(self.cfg.init_scale)
        self._clean_steps = 0  # consecutive steps without inf/NaN, GradScaler's "growth tracker"
        self._unscaled = False
        self.found_inf = False
        self.history: list[tuple[float, bool]] = []

    def get_scale(self) -> float:
        return self._scale

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """S · loss: backward of this gives gradients S times larger, lifted out of fp16's underflow range."""
        return loss * self._scale

    @torch.no_grad()
    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide every gradient of ``optimizer``'s (fp32) parameters by S and record whether any is inf/NaN."""
        if self._unscaled:
            raise RuntimeError("unscale_() was already called since the last update(); call it once per step")
        found = False
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.dtype != torch.float32:
                    raise ValueError(f"a gradient of dtype {p.grad.dtype} reached the loss scaler; unscale into "
                                     "fp32 master gradients (MixedPrecision does), or gradients underflow again")
                p.grad.mul_(1.0 / self._scale)  # S is a power of two by default: exact
                found = found or not bool(torch.isfinite(p.grad).all())
        self.found_inf, self._unscaled = found, True

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale if not done yet, then step ``optimizer`` unless a gradient overflowed; True if it stepped."""
        if not self._unscaled:
            self.unscale_(optimizer)
        if not self.found_inf:
            optimizer.step()
        return not self.found_inf

    def update(self) -> None:
        """Back off after an overflow, grow after ``growth_interval`` clean steps (GradScaler's rule)."""
        if not self._unscaled:
            raise RuntimeError("update() before unscale_() or step(): nothing was checked for inf/NaN this step")
        if self.found_inf:
            self._scale *= self.cfg.backoff_factor
            self._clean_steps = 0
        else:
            self._clean_steps += 1
            if self._clean_steps == self.cfg.growth_interval:
                grown = self._scale * self.cfg.growth_factor
                self._scale = grown if math.isfinite(grown) else self._scale
                self._clean_steps = 0
        self.history.append((self._scale, self.found_inf))
        self._unscaled = False


@dataclass(frozen=True)
class MixedPrecisionConfig:
    dtype: torch.dtype = torch.float16  # what the model computes and stores its weights and gradients in
    loss_scaling: bool | None = None  # None: on for float16, off for bfloat16 (its range is fp32's)
    scaler: LossScalerConfig = field(default_factory=LossScalerConfig)

    def __post_init__(self) -> None:
        if self.dtype not in LOW_PRECISION:
            raise ValueError(f"dtype={self.dtype} is not a 16-bit float; use torch.float16 or torch.bfloat16 "
                             "(float32 training needs no MixedPrecision)")
        if not isinstance(self.scaler, LossScalerConfig):
            raise TypeError(f"scaler must be a LossScalerConfig, got {type(self.scaler).__name__}")

    @property
    def scaled(self) -> bool:
        return self.dtype == torch.float16 if self.loss_scaling is None else self.loss_scaling


@dataclass(frozen=True)
class StepRecord:
    scale: float  # S used for this step's backward (1.0 without loss scaling)
    skipped: bool  # True when a gradient overflowed and the update was dropped


class MixedPrecision:
    """Train ``model`` in 16 bits against an fp32 master copy of its parameters.

    ``model`` is cast to ``cfg.dtype`` in place; ``make_optimizer(master_params)`` builds the optimizer over
    the fp32 masters. Each step is ``backward(loss)`` then ``step()``. ``scaler`` defaults to a
    :class:`DynamicLossScaler` when ``cfg.scaled``; any object with GradScaler's calls (``torch.amp.GradScaler``
    itself) works. ``history`` lists a :class:`StepRecord` per step.
    """

    def __init__(self, model: nn.Module, make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                 cfg: MixedPrecisionConfig | None = None, scaler=None) -> None:
        cfg = config_or_default(cfg, MixedPrecisionConfig, "MixedPrecisionConfig(dtype=torch.float16)")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if scaler is not None and not cfg.scaled:
            raise ValueError(f"a scaler was passed but cfg.loss_scaling is off for {cfg.dtype}; pass "
                             "MixedPrecisionConfig(loss_scaling=True) or drop the scaler")
        self.cfg, self.model = cfg, model
        self.params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]  # tied weights once
        if not self.params:
            raise ValueError("model has no trainable parameters (requires_grad=True)")
        self.master = [nn.Parameter(p.detach().float().clone()) for p in self.params]  # θ₃₂, taken before the cast
        model.to(cfg.dtype)  # θ₁₆ = round(θ₃₂): nn.Module.to casts parameters in place, so self.params stay valid
        self.optimizer = make_optimizer(self.master)
        self.scaler = (scaler if scaler is not None else DynamicLossScaler(cfg.scaler)) if cfg.scaled else None
        self.history: list[StepRecord] = []

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of S · loss (of loss without scaling) through the 16-bit model."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    @torch.no_grad()
    def step(self, max_grad_norm: float | None = None) -> StepRecord:
        """Move the 16-bit gradients into fp32, unscale, clip, update the masters and copy them back."""
        scale = self.scaler.get_scale() if self.scaler is not None else 1.0
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.float()  # (like p) fp32 copy of the scaled gradient
            p.grad = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # g = ∇ / S, inf/NaN recorded
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.master, max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when a gradient overflowed
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale  # a skip is always followed by a backoff (b < 1)
        else:
            skipped = not all(torch.isfinite(m.grad).all() for m in self.master if m.grad is not None)
            if not skipped:
                self.optimizer.step()
        if not skipped:
            for p, m in zip(self.params, self.master):
                p.copy_(m)  # θ₁₆ ← round(θ₃₂)
        for m in self.master:
            m.grad = None
        record = StepRecord(scale, skipped)
        self.history.append(record)
        return record


@dataclass(frozen=True)
class CastReport:
    dtype: str
    scale: float  # the values were multiplied by it before the cast
    nonzero: int  # nonzero, finite inputs
    flushed_to_zero: float  # fraction of them that became 0 (below half the smallest subnormal)
    subnormal: float  # fraction kept only as a subnormal (fewer significant bits than the format has)
    overflowed: float  # fraction that became ±inf (beyond the largest finite value)
    median_relative_error: float  # over the values that stayed finite and nonzero, after dividing by scale


def cast_report(values: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> CastReport:
    """What casting ``scale · values`` to ``dtype`` does to them: how many vanish, degrade or overflow.

    ``values`` are fp32 (gradients, activations); zeros and non-finite entries are not counted.
    """
    if dtype not in LOW_PRECISION + (torch.float32,):
        raise ValueError(f"dtype={dtype} is not a float format this measures; use float16, bfloat16 or float32")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale} must be a finite number > 0 (a loss scale S)")
    x = values.detach().float().reshape(-1)
    x = x[torch.isfinite(x) & (x != 0)]  # (n,)
    if x.numel() == 0:
        raise ValueError("values has no nonzero finite entry to measure; pass e.g. a gradient tensor")
    scaled = x.double() * scale  # exact: fp32 values times a power of two in float64
    cast = scaled.to(dtype)  # (n,) the rounded, possibly 0 or inf, values
    info = torch.finfo(dtype)
    zero, inf = cast == 0, torch.isinf(cast)
    sub = ~zero & ~inf & (cast.abs() < info.tiny)  # below the smallest normal number
    kept = ~zero & ~inf
    rel = ((cast[kept].double() - scaled[kept]).abs() / scaled[kept].abs()).float()
    n = x.numel()
    return CastReport(str(dtype).removeprefix("torch."), scale, n, zero.sum().item() / n, sub.sum().item() / n,
                      inf.sum().item() / n, rel.median().item() if rel.numel() else float("nan"))


def format_limits(dtype: torch.dtype) -> dict[str, float | int]:
    """The numbers that decide underflow and overflow: largest, smallest normal and subnormal, machine epsilon."""
    info = torch.finfo(dtype)
    smallest = torch.tensor(info.tiny, dtype=dtype)
    while (half := smallest / 2) > 0:  # walk down the subnormals to the last representable nonzero
        smallest = half
    return {"bits": info.bits, "max": info.max, "smallest normal": info.tiny,
            "smallest subnormal": smallest.item(), "epsilon": info.eps}


def lost_update_fraction(weights: Iterable[torch.Tensor], updates: Iterable[torch.Tensor],
                         dtype: torch.dtype = torch.float16) -> float:
    """Fraction of nonzero ``updates`` that vanish when added to ``weights`` stored in ``dtype``.

    The reason for the fp32 master copy (§3.1): an update smaller than half the spacing of the 16-bit numbers
    around a weight rounds back to the same weight, so ``w + Δ == w`` and the step is lost.
    """
    lost = total = 0
    for w, d in zip(weights, updates, strict=True):
        w16, d = w.detach().to(dtype), d.detach()
        moved = d != 0
        same = (w16.float() + d.float()).to(dtype) == w16  # (like w) the sum rounds back to the weight
        lost += (same & moved).sum().item()
        total += moved.sum().item()
    if total == 0:
        raise ValueError("updates are all zero; pass the changes an optimizer step would make")
    return lost / total
