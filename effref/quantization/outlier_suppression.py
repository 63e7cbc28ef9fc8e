"""Outlier Suppression+: shift each activation channel to its centre, scale the widest ones, fold both away.

Paper: Wei, Zhang, Li, Zhang, Gong, Guo, Liu (2023), "Outlier Suppression+: Accurate quantization of large
language models by equivalent and optimal shifting and scaling", arXiv:2304.09145 — §4, Eq. 3–8.
Implements: outlier channels of LLM activations are not only large but *asymmetric* (one channel lives in
[−2, 60], another in [−70, 1]). OS+ first moves every channel to be centred on zero, then shrinks the
channels that are still wider than a threshold t:

    z_j = (max X_j + min X_j) / 2,          X̃ = X − z                       (channel-wise shift, Eq. 4)
    s_j = max(1, max|X̃_j| / t),            X' = X̃ diag(s)⁻¹                (channel-wise scale, Eq. 6)
    Y = X W + b = X' (diag(s) W) + (z W + b)                                  (the next layer absorbs both)

so the model's function is unchanged before rounding: the producer of X (a norm, or v_proj) is divided by
s and given the bias −z/s, the consumers' weight columns are multiplied by s and their bias gains W z.
t is chosen by a grid search that minimises the quantized output error of the consumers on calibration
rows, ‖Q_a(X') Q_w(diag(s) W) − X̃ W‖² (Eq. 8, summed over the linears that read X), over candidates spaced
geometrically from the widest channel's half-range (no scaling) down to the narrowest channel's. The shift is exact
through attention's v → o path too (softmax weights sum to 1), but not through SwiGLU's product: the
up → down group is only scaled.
Glossary: X (T × C) activations · z (C,) shift · s (C,) scale · t clipping threshold · W, b the consumer.
Left out: the paper's coarse-to-fine search with per-channel refinement and its OPT/BLOOM LayerNorm-bias
folding details; static activation calibration. A model with shifts has biases the original architecture
lacks, so ``load_quantized`` needs a skeleton transformed the same way (not provided).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from effref.checks import calibration_or_none, config_or_default
from effref.quantization.basics import fake_quantize
from effref.quantization.driver import LayerInputs
from effref.quantization.smoothquant import (
    SmoothGroup,
    apply_channel_transform,
    collect_group_stats,
    default_probe,
    keep_function,
    smoothing_groups,
)
from effref.quantization.zeroquant import WAQuantConfig, quantize_activations, wa_quantize_model
from effref.runtime import progress_bar

NEEDS = ("min", "max", "samples")


@dataclass
class OSPlusConfig:
    n_grid: int = 20  # candidate thresholds, geometric from the widest channel's range down to the narrowest
    kinds: tuple[str, ...] | None = None  # None: every kind the model has (see smoothing_groups)
    max_samples: int = 512  # calibration rows (tokens) per group used in the search
    max_out_rows: int = 256  # output channels per consumer scored in the search (a seeded subset; per-row
    # weight quantization makes the error of a row independent of the others, so the subset is unbiased)
    quant: WAQuantConfig = field(default_factory=lambda: WAQuantConfig(w_granularity="channel", a_granularity="tensor"))

    def __post_init__(self) -> None:
        if isinstance(self.n_grid, bool) or not isinstance(self.n_grid, int) or self.n_grid < 1:
            raise ValueError(f"n_grid={self.n_grid!r} must be a positive integer (the paper's search uses ~20)")


def _quantized_error(x: torch.Tensor, scale_in: torch.Tensor, weights: list[torch.Tensor],
                     targets: list[torch.Tensor], quant: WAQuantConfig) -> float:
    """Σ over consumers of ‖Q_a(x / s) Q_w(W diag(s))ᵀ − target‖² for shifted rows x (m, C_in)."""
    x_q = quantize_activations(x / scale_in, quant.a_bits, quant.a_granularity)  # (m, C_in)
    err = 0.0
    for w, target in zip(weights, targets):
        w_q = fake_quantize(w * scale_in[None, :], quant.weight_config())  # (out, C_in)
        err += (x_q @ w_q.T - target).pow(2).sum().item()
    return err


@torch.no_grad()
def os_plus_factors(group: SmoothGroup, stats: LayerInputs, cfg: OSPlusConfig) -> tuple[torch.Tensor | None,
                                                                                      torch.Tensor, float]:
    """Layer-level: the shift z (None where shifting is not exact), scale s and threshold t for one group."""
    for need in NEEDS:
        if getattr(stats, need) is None:
            raise ValueError(f"stats for {group.name} lack {need!r}; collect them with needs={NEEDS}")
    device = group.linears()[0].weight.device
    lo, hi = group.reduce(stats.min.to(device), "min"), group.reduce(stats.max.to(device))  # (C,) each
    shift = (hi + lo) / 2 if group.shift_ok else None  # Eq. 4: the centre of each channel's range
    half_range = (hi - lo) / 2 if group.shift_ok else torch.maximum(hi.abs(), lo.abs())  # (C,) max|X̃_j|
    x = stats.samples[: cfg.max_samples].to(device).float()  # (m, C_in)
    if shift is not None:
        x = x - group.expand(shift)[None, :]  # X̃
    generator = torch.Generator().manual_seed(0)
    weights = []
    for lin in group.linears():
        rows = torch.randperm(lin.out_features, generator=generator)[: cfg.max_out_rows].to(device)
        weights.append(lin.weight.detach()[rows].float())  # (≤ max_out_rows, C_in)
    targets = [x @ w.T for w in weights]  # the unquantized outputs, without the bias W z (it is exact)
    best = (float("inf"), None, None)
    top, bottom = half_range.max().item(), half_range.min().clamp(min=1e-8).item()
    for k in range(cfg.n_grid):  # k = 0: t = the widest range, so s = 1 (shift only); then geometric steps down
        t = top * (bottom / top) ** (k / max(cfg.n_grid - 1, 1))
        scale = torch.clamp(half_range / t, min=1.0)  # (C,) Eq. 6
        err = _quantized_error(x, group.expand(scale), weights, targets, cfg.quant)
        if err < best[0]:
            best = (err, scale, t)
    return shift, best[1], best[2]


def os_plus_transform(model: nn.Module, calib_batches: torch.Tensor | None = None, cfg: OSPlusConfig | None = None,
                      stats: dict[str, LayerInputs] | None = None, progress: bool = True) -> dict[str, dict]:
    """Model-level, before rounding: shift and scale every group in place; return {group: {shift, scale, t}}.

    ``stats`` (from ``collect_group_stats(..., needs=("min", "max", "samples"))``) may be shared with
    SmoothQuant; otherwise one calibration pass over ``calib_batches`` collects them.
    """
    cfg = config_or_default(cfg, OSPlusConfig, "OSPlusConfig()")
    calib_batches = calibration_or_none(calib_batches, "os_plus_transform")
    probe = None if calib_batches is None else calib_batches[:1, :64]  # (1, ≤ 64) token ids
    groups = smoothing_groups(model, cfg.kinds, probe)
    if stats is None:
        if calib_batches is None:
            raise ValueError("os_plus_transform needs activation statistics: pass calib_batches=calibration_batches("
                             "ids, n, seq_len) or stats=collect_group_stats(..., needs=('min', 'max', 'samples'))")
        stats = collect_group_stats(model, groups, calib_batches, NEEDS, cfg.max_samples, progress=progress)
    missing = [group.name for group in groups if group.name not in stats]
    if missing:
        raise ValueError(f"stats has no entry for {missing[:3]}; collect them on this model's groups")
    chosen = {}

    def transform() -> None:
        for group in progress_bar(groups, desc="OS+ shift and scale", disable=not progress):
            shift, scale, t = os_plus_factors(group, stats[group.name], cfg)
            apply_channel_transform(group, scale, shift)
            chosen[group.name] = {"shift": shift, "scale": scale, "t": t}

    keep_function(model, groups, probe if probe is not None else default_probe(model), transform)
    return chosen


def os_plus_model(model: nn.Module, calib_batches: torch.Tensor | None = None, cfg: OSPlusConfig | None = None,
                  stats: dict[str, LayerInputs] | None = None, progress: bool = True) -> nn.Module:
    """Outlier Suppression+ then W8A8 quantization of every block linear with ``cfg.quant``; in place."""
    calib_batches = calibration_or_none(calib_batches, "os_plus_model")
    cfg = config_or_default(cfg, OSPlusConfig, "OSPlusConfig()")
    os_plus_transform(model, calib_batches, cfg, stats, progress)
    return wa_quantize_model(model, cfg.quant, progress=progress)


__all__ = ["NEEDS", "OSPlusConfig", "os_plus_factors", "os_plus_model", "os_plus_transform"]
