"""GPTQ: accurate post-training quantization for generative transformers.

Paper: Frantar, Ashkboos, Hoefler, Alistarh (2023), arXiv:2210.17323 — Algorithm 1; built on Optimal Brain
Quantization (Frantar & Alistarh, 2022, arXiv:2208.11580).
Implements: for one linear layer, minimise ||W X - Ŵ X||² column by column. Quantizing column j of W costs
(w_j - q_j)² / [H⁻¹]_jj, and the remaining columns F absorb the error (OBQ update, Eq. 2 of the paper):
    δ_F = -(w_j - q_j) / [H⁻¹]_jj · (H⁻¹)_{j,F}
With the columns visited in a fixed order, every row shares one inverse Hessian, whose successive
eliminations are the rows of the upper Cholesky factor U of H⁻¹ (Step 3), so
    err_j = (w_j - q_j) / U_jj,   W_{:, j:} -= err_j · U_{j, j:}
Lazy batches (Step 2): the update is applied inside a block of B = 128 columns at once, and to the columns
after the block in one matrix product at its end. Damping λ = 1% of mean(diag H) keeps H invertible.
Act-order (a later addition of the reference code): visit columns by decreasing H_jj. Groups: a fresh scale and
zero point every g columns, fitted on the *updated* weights when the group starts; with act-order the groups
are fitted up front on the original weights ("static groups") so the stored layout stays contiguous.
Glossary: W (d_out × d_in) weight · H = XᵀX / n (the paper's 2XXᵀ up to a factor) · λ damping · U upper
          Cholesky factor of H⁻¹ · B block size · g group size · perm column order (act-order).
Left out: the fused CUDA kernels and the "true sequential" order inside a block; kernels/ has a Triton matmul.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from effref.checks import calibration_or_none, config_or_default
from effref.compression.hessian import inverse_hessian_cholesky
from effref.quantization.basics import QTensor, QuantConfig, dequantize_codes, find_params, quantize_codes
from effref.quantization.driver import LayerInputs, group_check, quantize_model
from effref.quantization.linear import QuantLinear


@dataclass
class GPTQConfig:
    quant: QuantConfig = field(default_factory=QuantConfig)  # bits, granularity, group size
    block_size: int = 128  # B: columns per lazy batch
    damp: float = 0.01  # λ = damp · mean(diag H)
    act_order: bool = False  # visit columns by decreasing H_jj

    def __post_init__(self) -> None:
        if not isinstance(self.quant, QuantConfig):
            raise TypeError(f"quant must be a QuantConfig, got {type(self.quant).__name__}")
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} must be ≥ 1 (the paper uses 128)")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp={self.damp} must lie in [0, 1); the paper uses 0.01 of the mean diagonal")


class Grid:
    """Round-to-nearest onto per-row (per-group) min-max grids; records codes and statistics.

    GPTQ calls ``fit`` when a group starts (with the group's current weights and the diagonal of U for its
    columns) and ``round`` for each column. SpQR subclasses it to keep outliers and quantize statistics.
    """

    def __init__(self, cfg: QuantConfig, rows: int, cols: int, device: torch.device | str = "cpu"):
        self.cfg, self.rows, self.cols = cfg, rows, cols
        self.g = cfg.group_size_for(cols) if cfg.granularity == "group" else cols
        n_rows, n_groups = cfg.groups(rows, cols)
        self.scale = torch.zeros(n_rows, n_groups, device=device)
        self.zero = None if cfg.symmetric else torch.zeros(n_rows, n_groups, device=device)
        self.codes = torch.zeros(rows, cols, dtype=torch.int16, device=device)

    def fit(self, w: torch.Tensor, group: int, u_diag: torch.Tensor) -> None:
        """Statistics of group ``group`` from its current weights ``w`` (R, g) (or the whole W when g = C)."""
        if self.cfg.granularity == "tensor":
            w = w.reshape(1, -1)
        scale, zero = find_params(w, self.cfg.bits, self.cfg.symmetric, self.cfg.scale_dtype)  # (R or 1, 1)
        self.scale[:, group] = scale[:, 0]
        if zero is not None:
            self.zero[:, group] = zero[:, 0]

    def round(self, col: torch.Tensor, j: int) -> torch.Tensor:
        """Quantize column ``j`` (original index) with its group's grid; return its dequantized value (R,)."""
        g = j // self.g
        scale = self.scale[:, g]
        zero = None if self.zero is None else self.zero[:, g]
        codes = quantize_codes(col, scale, zero, self.cfg.bits)  # (R,)
        self.codes[:, j] = codes
        return dequantize_codes(codes, scale, zero)

    def result(self) -> dict:
        q = QTensor(self.codes, self.scale.to(self.cfg.scale_dtype),
                    None if self.zero is None else self.zero.to(torch.uint8), self.cfg.bits, self.cfg.granularity,
                    self.g if self.cfg.granularity == "group" else self.cfg.group_size, self.cfg.symmetric,
                    (self.rows, self.cols))
        return {"qtensor": q}


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, cfg: GPTQConfig | None = None,
                  grid: Grid | None = None) -> dict:
    """Quantize weight ``w`` (R, C) with Hessian ``hessian`` (C, C) = XᵀX / n; Algorithm 1 of the paper.

    Returns the grid's result (``{"qtensor": QTensor, ...}``) plus ``"loss"``, the sum over columns of
    err_j² (the layer loss increase the algorithm accounts for, up to a constant).
    """
    cfg = config_or_default(cfg, GPTQConfig, "GPTQConfig(QuantConfig(bits=4))")
    if w.ndim != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"w must be (R, C) and hessian (C, C); got w {tuple(w.shape)}, hessian "
                         f"{tuple(hessian.shape)} — pass stats.hessian of this layer's inputs")
    rows, cols = w.shape
    qcfg = cfg.quant
    qcfg.check_input_dim(cols)
    grid = grid or Grid(qcfg, rows, cols, w.device)
    W = w.detach().float().clone()  # (R, C)
    H = hessian.detach().double().clone().to(W.device)
    dead = H.diagonal() == 0  # inputs that never fire: any value is free, so quantize zeros
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(H.diagonal(), descending=True) if cfg.act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    U = inverse_hessian_cholesky(H, cfg.damp)[0].float()  # (C, C) upper, H⁻¹ = UᵀU after λ damping
    g = grid.g
    block = cfg.block_size if (cfg.block_size % g == 0 or g % cfg.block_size == 0) else g  # align blocks
    static = qcfg.granularity != "group" or cfg.act_order  # fit every group up front on the original W
    if static:
        u_orig = torch.empty(cols, dtype=U.dtype, device=U.device)
        u_orig[perm] = U.diagonal()
        w_orig = W[:, torch.argsort(perm)]
        for start in range(0, cols, g):
            grid.fit(w_orig[:, start:start + g], start // g, u_orig[start:start + g])
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()  # (R, B) the block, updated column by column
        Err1 = torch.zeros_like(W1)  # (R, B) scaled errors err_j
        U1 = U[i1:i2, i1:i2]  # (B, B)
        for jj in range(i2 - i1):
            j = int(perm[i1 + jj])  # original column index
            if not static and j % g == 0:  # a group starts: fit on its current weights
                current = W1[:, jj:jj + g] if jj + g <= i2 - i1 else W[:, i1 + jj:i1 + jj + g]  # (R, g)
                grid.fit(current, j // g, U.diagonal()[i1 + jj:i1 + jj + g])
            col = W1[:, jj]
            q = grid.round(col, j)  # (R,)
            err = (col - q) / U1[jj, jj]  # err_j
            W1[:, jj:] -= err[:, None] * U1[jj, jj:][None, :]  # OBQ update inside the block
            Err1[:, jj] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update of everything after the block
        loss += Err1.double().pow(2).sum()
    out = grid.result()
    out["loss"] = float(loss)
    return out


def gptq_layer(linear: nn.Linear, stats: LayerInputs, cfg: GPTQConfig | None = None) -> QuantLinear:
    """Layer-level GPTQ: a QuantLinear replacing ``linear``, from its calibration statistics."""
    cfg = config_or_default(cfg, GPTQConfig, "GPTQConfig(QuantConfig(bits=4))")
    if stats is None or stats.hessian is None:
        raise ValueError("GPTQ needs the Hessian of the layer's inputs; run it through gptq_model with "
                         "calib_batches, or pass LayerInputs with hessian set")
    return QuantLinear.from_linear(linear, gptq_quantize(linear.weight, stats.hessian, cfg)["qtensor"])


def gptq_model(model: nn.Module, calib_batches: torch.Tensor, cfg: GPTQConfig | None = None, **driver) -> nn.Module:
    """Model-level GPTQ: every linear of every block, calibrated sequentially; returns the model, in place.

    ``**driver`` goes to ``quantize_model``: ``target`` (which linears), ``block_ids``, ``batch_size``,
    ``max_samples``, ``seed``, ``progress`` and ``stats`` (shared calibration statistics).
    """
    calib_batches = calibration_or_none(calib_batches, "gptq_model")
    cfg = config_or_default(cfg, GPTQConfig, "GPTQConfig(QuantConfig(bits=4))")
    return quantize_model(model, lambda name, linear, stats: gptq_layer(linear, stats, cfg), calib_batches,
                          needs=("hessian",), desc="GPTQ", check=group_check(cfg.quant), **driver)
