"""SparseGPT: one-shot pruning with an optimal-brain-surgeon weight update, column block by column block.

Paper: Frantar & Alistarh (2023), "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
arXiv:2301.00774 — Algorithm 1, §3.2 (row-Hessian reuse), §3.3 (adaptive mask selection), §3.4 (N:M).
Implements, for a layer W (d_out × d_in) with calibration Hessian H = XᵀX / n:
  U = upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹, λ = 1 %;
  for each block of B = 128 columns: choose the block's mask from the OBS saliency w²/U_jj² (Eq. 7 with
  [H⁻¹]_jj replaced by U_jj², its value once earlier columns are fixed) — exactly k_b weights, or the M − N
  lowest of every M inputs for N:M; then column by column: err = w_j / U_jj on pruned rows (0 elsewhere),
  W[:, j:] −= err · U[j, j:]  (the OBS update, Eq. 5, restricted to columns ≥ j); finally the block's
  accumulated errors update all later columns at once (lazy batching: one matmul per block).
Glossary: W weight · H Hessian of the layer loss ||WX − ŴX||² (up to 2/n) · λ damp · U chol(H⁻¹) upper
          · B block size · M1 the block's mask (True = pruned) · E1 the block's scaled errors.
Left out: joint sparsity + quantization (SparseGPT §3.5; see effref.quantization.gptq for the quantizer),
the paper's "true sequential" order inside a transformer block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from effref.checks import calibration_or_none
from effref.compression.calibration import InputStats
from effref.compression.hessian import inverse_hessian_cholesky
from effref.pruning.masks import PruneConfig, lowest, nm_mask, prune_linears, split_count


@dataclass
class SparseGPTConfig(PruneConfig):
    block_size: int = 128  # B: columns whose mask is chosen together and whose errors are applied lazily
    damp: float = 0.01  # λ: fraction of the mean Hessian diagonal added to it

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size={self.block_size!r} must be a positive integer, e.g. 128")
        if self.nm and self.block_size % self.nm[1]:
            raise ValueError(f"block_size={self.block_size} must be a multiple of M={self.nm[1]} so no N:M "
                             f"group straddles two blocks; use e.g. block_size=128")


def sparsegpt_prune(weight: torch.Tensor, stats: InputStats, cfg: PruneConfig | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned and updated copy of ``weight`` (out, in), mask with True = pruned); Algorithm 1 of the paper.

    Works in float64 when ``weight`` is float64 (tests), else in float32.
    """
    cfg = cfg if isinstance(cfg, SparseGPTConfig) else SparseGPTConfig(
        **({} if cfg is None else {"sparsity": cfg.sparsity, "nm": cfg.nm}))
    cfg.check_shape(weight)
    if stats is None or stats.hessian is None:
        raise ValueError("sparsegpt_prune needs input statistics with a hessian; collect them with "
                         "needs=('hessian',)")
    rows, cols = weight.shape
    if stats.hessian.shape != (cols, cols):
        raise ValueError(f"hessian has shape {tuple(stats.hessian.shape)} but the weight has in_features={cols}; "
                         "pass the statistics of this layer's inputs")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    U = inverse_hessian_cholesky(stats.hessian.to(weight.device), cfg.damp)[0].to(dtype)  # (in, in)
    W = weight.to(dtype).clone()  # (out, in), updated in place
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=weight.device)
    starts = list(range(0, cols, cfg.block_size))
    widths = [min(cfg.block_size, cols - s) for s in starts]
    counts = split_count(round(cfg.sparsity * rows * cols), [rows * w for w in widths])  # weights per block
    for i1, width, k_block in zip(starts, widths, counts):
        i2 = i1 + width
        # The block is held transposed, (B, out): column j of W is the contiguous row j of W1.
        W1, U1 = W[:, i1:i2].T.clone(), U[i1:i2, i1:i2]  # (B, out), (B, B)
        d = torch.diagonal(U1)  # (B,) U_jj
        E1 = torch.empty_like(W1)  # (B, out) scaled errors, applied to later blocks in one go
        # §3.3 adaptive mask selection: Eq. 7 saliency w²/[H⁻¹]_jj, chosen for the whole block at once
        M1 = torch.zeros_like(W1, dtype=torch.bool) if cfg.nm else lowest(W1.pow(2) / d.pow(2)[:, None], k_block)
        scale = M1.to(dtype) / d[:, None]  # (B, out) 1/U_jj where pruned, 0 where kept
        for j in range(width):
            if cfg.nm and j % cfg.nm[1] == 0:  # §3.4: N:M masks chosen M columns at a time, just in time
                m = cfg.nm[1]
                M1[j:j + m] = nm_mask((W1[j:j + m].pow(2) / d[j:j + m].pow(2)[:, None]).T, *cfg.nm).T
                scale[j:j + m] = M1[j:j + m].to(dtype) / d[j:j + m, None]
            torch.mul(W1[j], scale[j], out=E1[j])  # (out,) err = (w − q)/U_jj with q = 0 where pruned
            W1[j:].addr_(U1[j, j:], E1[j], alpha=-1)  # Eq. 5: OBS update of the columns ≥ j
        W1[M1] = 0.0  # exact zeros (the update already drove them to ~0)
        W[:, i1:i2] = W1.T
        W[:, i2:] -= E1.T @ U[i1:i2, i2:]  # lazy batch update of every later column: (out, B) @ (B, rest)
        mask[:, i1:i2] = M1.T
    return W.to(weight.dtype), mask


def sparsegpt_prune_model(model: nn.Module, calib_batches: torch.Tensor | None = None, cfg: PruneConfig | None = None,
                          **kwargs) -> dict[str, torch.Tensor]:
    """SparseGPT on every linear of the decoder blocks, in place, sequentially by default; {name: mask}."""
    calib_batches = calibration_or_none(calib_batches, "sparsegpt_prune_model")
    return prune_linears(model, sparsegpt_prune, cfg, needs=("hessian",), calib_batches=calib_batches,
                         desc="sparsegpt", **kwargs)
