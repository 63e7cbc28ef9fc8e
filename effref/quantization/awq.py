"""AWQ: activation-aware weight quantization by per-input-channel scaling.

Paper: Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han (2024), arXiv:2306.00978 — §3.2, Eqs. 4-5.
Implements: weights that meet large activations matter most, and scaling such a weight column up before
rounding (and its input down by the same factor) shrinks its relative rounding error. For a linear y = x Wᵀ:
    y = (x · diag(s)⁻¹) (W · diag(s))ᵀ                    exactly, for any s > 0 (function-preserving)
    Ŵ(s) = Q(W · diag(s)) · diag(s)⁻¹                     what the quantized layer computes with
    s = s_x^α / sqrt(max(s_x^α) · min(s_x^α)),  s_x = mean |x| per input channel,
    α* = argmin_{α ∈ {0, 1/N, …, (N-1)/N}} ||X Wᵀ − X Ŵ(s)ᵀ||²      (Eq. 5, grid of N = 20)
The objective is measured on a seeded subsample of the calibration tokens (the driver's "samples", at most
512 rows by default), as the paper does with its calibration set; α = 0 is plain RTN, so the search can
only match or beat RTN on those tokens.
Glossary: s per-channel scale · s_x mean activation magnitude · α migration exponent · Q group-wise RTN (g = 128).
Left out: folding diag(s)⁻¹ into the previous RMSNorm / linear (we keep s as an fp16 vector in the layer, the
same function, 16 bits per input channel more), one shared s for q/k/v and gate/up, block-output losses,
and AWQ's weight-clipping search.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from effref.checks import calibration_or_none, config_or_default
from effref.quantization.basics import QuantConfig, quantize
from effref.quantization.driver import LayerInputs, group_check, quantize_model
from effref.quantization.linear import QuantLinear


@dataclass
class AWQConfig:
    quant: QuantConfig = field(default_factory=QuantConfig)  # group-wise, g = 128 by default
    n_grid: int = 20  # N: α ∈ {0, 1/N, ..., (N-1)/N}

    def __post_init__(self) -> None:
        if not isinstance(self.quant, QuantConfig):
            raise TypeError(f"quant must be a QuantConfig, got {type(self.quant).__name__}")
        if self.n_grid < 1:
            raise ValueError(f"n_grid={self.n_grid} must be ≥ 1 (the paper searches 20 points)")


def awq_scales(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = s_x^α normalised so that max(s)·min(s) = 1 (the paper's reference code), rounded to fp16."""
    s = abs_mean.float().clamp(min=1e-5).pow(alpha)  # (C,)
    s = s / (s.max() * s.min()).sqrt()
    s = s.clamp(2.0 ** -14, 65504.0)  # inside fp16's normal range: any s > 0 keeps the function, inf / 0 do not
    return s.half().float()  # the stored value, so quantization sees exactly what the layer will use


def output_error(delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """||X ΔWᵀ||² / n for calibration rows X (n, C): the mean squared output change of the layer."""
    return (x.float() @ delta.T).pow(2).sum() / x.shape[0]


def awq_search(w: torch.Tensor, abs_mean: torch.Tensor, x: torch.Tensor,
               cfg: AWQConfig | None = None) -> tuple[torch.Tensor, float, list[float]]:
    """Grid search of α for weight ``w`` (R, C) on inputs ``x`` (n, C): (best s (C,), best α, loss per α)."""
    cfg = config_or_default(cfg, AWQConfig, "AWQConfig(QuantConfig(bits=4))")
    w = w.detach().float()
    losses, best = [], (None, 0.0, float("inf"))
    for k in range(cfg.n_grid):
        alpha = k / cfg.n_grid
        s = awq_scales(abs_mean, alpha)  # (C,)
        w_hat = quantize(w * s, cfg.quant).dequantize() / s  # Ŵ(s) = Q(W diag(s)) diag(s)⁻¹
        loss = float(output_error(w_hat - w, x))
        losses.append(loss)
        if loss < best[2]:
            best = (s, alpha, loss)
    return best[0], best[1], losses


def awq_layer(linear: nn.Linear, stats: LayerInputs, cfg: AWQConfig | None = None) -> QuantLinear:
    """Layer-level AWQ: search α, store Q(W·diag(s)) and s (the layer divides by s when it dequantizes)."""
    cfg = config_or_default(cfg, AWQConfig, "AWQConfig(QuantConfig(bits=4))")
    if stats is None or stats.abs_mean is None or stats.samples is None:
        raise ValueError("AWQ needs the mean |x| and sample rows of the layer's inputs; run it through "
                         "awq_model with calib_batches, or pass LayerInputs with abs_mean and samples set")
    s, alpha, _ = awq_search(linear.weight, stats.abs_mean, stats.samples, cfg)
    q = quantize(linear.weight.detach().float() * s, cfg.quant)
    return QuantLinear.from_linear(linear, q, input_scale=s, alpha=alpha)


def awq_model(model: nn.Module, calib_batches: torch.Tensor, cfg: AWQConfig | None = None, **driver) -> nn.Module:
    """Model-level AWQ over every linear of every block; returns the model, changed in place.

    ``**driver`` goes to ``quantize_model``: ``target`` (which linears), ``block_ids``, ``batch_size``,
    ``max_samples``, ``seed``, ``progress`` and ``stats`` (shared calibration statistics).
    """
    calib_batches = calibration_or_none(calib_batches, "awq_model")
    cfg = config_or_default(cfg, AWQConfig, "AWQConfig(QuantConfig(bits=4))")
    return quantize_model(model, lambda name, linear, stats: awq_layer(linear, stats, cfg), calib_batches,
                          needs=("abs_mean", "samples"), desc="AWQ", check=group_check(cfg.quant), **driver)
