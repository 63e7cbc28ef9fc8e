"""SpQR: a sparse-quantized representation — tiny groups, quantized statistics, fp16 outliers.

Paper: Dettmers, Svirschevski, Egiazarian, Kuznedelev, Frantar, Ashkboos, Borzunov, Hoefler, Alistarh (2023),
arXiv:2306.03078 — §4.1 (bilevel quantization, outliers) and Algorithm 1.
Implements, inside GPTQ's column loop (gptq.py), a different grid per group of β1 = 16 input columns:
  1. the error of a group row in GPTQ's own units, E = Σ_j ((w_j − q(w_j)) / U_jj)² (the loss increase of
     GPTQ's Eq. 2), with the row's min-max grid; and, leaving each weight i out in turn, E₋ᵢ: the error of
     the others on a grid fitted without i (the paper's leave-one-out criterion, §4.1);
  2. outliers: weights whose removal saves more than τ typical weights' worth, E − E₋ᵢ > τ · mean(E) / β1;
     they are kept exactly (fp16, stored sparsely), make no error for GPTQ to propagate, and the
     group's grid is refitted on the other weights;
  3. bilevel statistics: the group's per-row scales and zero points (R numbers each) are themselves
     quantized to 3 bits by min-max in groups of β2 = 16 rows, with fp16 second-level scales and zeros;
     GPTQ then rounds to the grid of the *quantized* statistics.
Storage per weight ≈ b + 2·3/β1 + 2·(16 + 16)/(β1·β2) bits, plus 48 bits (int32 index + fp16 value) per outlier.
Glossary: β1 first-level group (input columns) · β2 second-level group (rows) · τ outlier threshold · E
          group error · U upper Cholesky factor of H⁻¹ (gptq.py).
Left out: iterating the leave-one-out search (one outlier per row and group is judged at a time), CSR storage
with 16-bit column indices, the act-order permutation; the sparse-dense CUDA kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from effref.checks import calibration_or_none, config_or_default
from effref.quantization.basics import QTensor, QuantConfig, quantize_codes
from effref.quantization.driver import LayerInputs, quantize_model
from effref.quantization.gptq import GPTQConfig, Grid, gptq_quantize
from effref.quantization.linear import QuantLinear


@dataclass
class SpQRConfig:
    bits: int = 3  # b: weight bits
    group_size: int = 16  # β1: input columns per first-level group
    stat_bits: int = 3  # bits of the quantized scales and zero points
    stat_group_size: int = 16  # β2: rows per second-level group
    outlier_threshold: float = 32.0  # τ, in typical weights' worth of error (≈0.5% outliers on SmolLM2)
    gptq: GPTQConfig = field(default_factory=lambda: GPTQConfig(act_order=False))

    def __post_init__(self) -> None:
        QuantConfig(self.bits, "group", self.group_size)  # validates bits and the group size
        QuantConfig(self.stat_bits, "group", self.stat_group_size)
        if self.outlier_threshold <= 0:
            raise ValueError(f"outlier_threshold={self.outlier_threshold} must be > 0 (e.g. 8.0); use float('inf') "
                             "for no outliers")
        if self.gptq.act_order:
            raise ValueError("act_order=True is not supported by SpQR here: its groups are fitted as GPTQ "
                             "reaches them, in column order")


class SpQRGrid(Grid):
    """GPTQ grid with per-group outliers and 3-bit statistics (see the module docstring)."""

    def __init__(self, cfg: SpQRConfig, rows: int, cols: int, device: torch.device | str = "cpu"):
        super().__init__(QuantConfig(cfg.bits, "group", cfg.group_size, scale_dtype=torch.float32), rows, cols,
                         device)
        self.spqr = cfg
        self.stat_cfg = QuantConfig(cfg.stat_bits, "group", cfg.stat_group_size, fit_group_size=True)
        self.outliers = torch.zeros(rows, cols, dtype=torch.bool, device=device)
        self.values = torch.zeros(rows, cols, device=device)  # the outliers' exact (GPTQ-updated) values
        self.stat_q: dict[str, list[QTensor]] = {"scale": [], "zero": []}

    def _errors(self, w: torch.Tensor, keep: torch.Tensor, u_diag: torch.Tensor) -> torch.Tensor:
        """Sum over kept weights of ((w − q(w)) / U_jj)², with a min-max grid fitted on the kept weights only."""
        kept = torch.where(keep, w, 0.0)  # (..., g); 0 lies in every grid's range anyway
        lo, hi = kept.amin(-1, keepdim=True).clamp(max=0), kept.amax(-1, keepdim=True).clamp(min=0)
        qmax = 2**self.cfg.bits - 1
        scale = ((hi - lo) / qmax).clamp(min=1e-12)
        zero = torch.round(-lo / scale)
        w_hat = ((torch.round(w / scale + zero).clamp(0, qmax)) - zero) * scale
        return (((w - w_hat) / u_diag).pow(2) * keep).sum(-1)

    def fit(self, w: torch.Tensor, group: int, u_diag: torch.Tensor) -> None:
        start, g = group * self.g, w.shape[1]
        everyone = torch.ones_like(w, dtype=torch.bool)
        base = self._errors(w, everyone, u_diag)  # (R,) group error with every weight on the grid
        leave_one_out = ~torch.eye(g, dtype=torch.bool, device=w.device)  # (g, g): row i drops weight i
        loo = self._errors(w[:, None, :].expand(-1, g, -1), leave_one_out, u_diag)  # (R, g)
        gain = base[:, None] - loo  # error saved by keeping weight i exactly
        mask = gain > self.spqr.outlier_threshold * base.mean() / g  # (R, g) outliers: worth τ typical weights
        self.outliers[:, start:start + g] = mask
        inliers = w.masked_fill(mask, 0.0)  # refit the grid without the outliers
        lo = inliers.amin(1, keepdim=True).clamp(max=0)  # (R, 1)
        hi = inliers.amax(1, keepdim=True).clamp(min=0)
        scale_q = self._quantize_stat((hi - lo).clamp(min=1e-12) / (2**self.cfg.bits - 1))
        scale = scale_q.dequantize().T  # (R, 1) the quantized scale ŝ
        zero_q = self._quantize_stat(-lo / scale)  # real-valued zero point w.r.t. ŝ, quantized the same way
        for name, qs in (("scale", scale_q), ("zero", zero_q)):
            self.stat_q[name].append(qs)
            getattr(self, name)[:, group] = qs.dequantize()[0]  # the grid GPTQ rounds to uses these

    def _quantize_stat(self, v: torch.Tensor) -> QTensor:
        """Min-max quantization of a statistic v (R, 1) in groups of β2 rows: a (1, R) QTensor, fp16 s₂, z₂."""
        b, rows = self.spqr.stat_bits, v.shape[0]
        beta2 = self.stat_cfg.group_size_for(rows)
        groups = v.reshape(-1, beta2)  # (R / β2, β2)
        lo, hi = groups.amin(1, keepdim=True), groups.amax(1, keepdim=True)
        s2 = ((hi - lo) / (2**b - 1)).half().clamp(min=torch.finfo(torch.float16).tiny).float()  # (R / β2, 1)
        z2 = (-lo / s2).half().float()  # real-valued second-level zero point
        codes = quantize_codes(groups, s2, z2, b)  # (R / β2, β2)
        return QTensor(codes.reshape(1, rows), s2.T.half(), z2.T.half(), b, "group", beta2, False, (1, rows))

    def round(self, col: torch.Tensor, j: int) -> torch.Tensor:
        q = super().round(col, j)
        keep = self.outliers[:, j]
        self.values[:, j] = torch.where(keep, col, 0.0)
        return torch.where(keep, col, q)  # outliers stay exact: no error to propagate

    def result(self) -> dict:
        stats = {}
        for name, parts in self.stat_q.items():  # (G, R) nested QTensors, one row per first-level group
            stats[name] = QTensor(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                                  torch.cat([p.zero for p in parts]), parts[0].bits, "group", parts[0].group_size,
                                  False, (len(parts), self.rows))  # (G, R) codes, (G, R / β2) s₂ and z₂
        q = QTensor(self.codes, stats["scale"], stats["zero"], self.cfg.bits, "group", self.g, False,
                    (self.rows, self.cols), transposed_stats=True)
        flat = self.outliers.reshape(-1).nonzero()[:, 0]  # flat indices r·C + j
        return {"qtensor": q, "outliers": self.outliers, "sparse_idx": flat,
                "sparse_val": self.values.reshape(-1)[flat].half()}


def spqr_quantize(w: torch.Tensor, hessian: torch.Tensor, cfg: SpQRConfig | None = None) -> dict:
    """SpQR for one weight (R, C): ``{"qtensor", "outliers" (R, C) bool mask, "sparse_idx", "sparse_val"}``."""
    cfg = config_or_default(cfg, SpQRConfig, "SpQRConfig()")
    rows, cols = w.shape
    grid = SpQRGrid(cfg, rows, cols, w.device)
    gcfg = GPTQConfig(grid.cfg, cfg.gptq.block_size, cfg.gptq.damp, act_order=False)
    return gptq_quantize(w, hessian, gcfg, grid=grid)


def spqr_layer(linear: nn.Linear, stats: LayerInputs, cfg: SpQRConfig | None = None) -> QuantLinear:
    """Layer-level SpQR: a QuantLinear with bilevel-quantized groups plus sparse fp16 outliers."""
    cfg = config_or_default(cfg, SpQRConfig, "SpQRConfig()")
    if stats is None or stats.hessian is None:
        raise ValueError("SpQR needs the Hessian of the layer's inputs; run it through spqr_model with "
                         "calib_batches, or pass LayerInputs with hessian set")
    out = spqr_quantize(linear.weight, stats.hessian, cfg)
    return QuantLinear.from_linear(linear, out["qtensor"], sparse_idx=out["sparse_idx"],
                                   sparse_val=out["sparse_val"])


def spqr_model(model: nn.Module, calib_batches: torch.Tensor, cfg: SpQRConfig | None = None, **driver) -> nn.Module:
    """Model-level SpQR over every linear of every block; returns the model, changed in place.

    ``**driver`` goes to ``quantize_model``: ``target`` (which linears), ``block_ids``, ``batch_size``,
    ``max_samples``, ``seed``, ``progress`` and ``stats`` (shared calibration statistics).
    """
    calib_batches = calibration_or_none(calib_batches, "spqr_model")
    cfg = config_or_default(cfg, SpQRConfig, "SpQRConfig()")
    return quantize_model(model, lambda name, linear, stats: spqr_layer(linear, stats, cfg), calib_batches,
                          needs=("hessian",), desc="SpQR", **driver)
