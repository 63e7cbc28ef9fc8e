"""Hessian-sensitivity mixed sparsity: more zeros where a layer tolerates them, the same total count.

Paper: Shao, Liu, Qian (2023), "One-Shot Sensitivity-Aware Mixed Sparsity
Pruning for Large Language Models", arXiv:2310.09499 (survey §2.1.2). The idea — allocate per-layer
sparsity from Hessian-based sensitivity while keeping the global ratio — is theirs; the allocation rule
below is ours, stated in full so it can be checked.
Implements, with the calibration Hessian H of each layer (damped by λ):
  1. OBS saliency of every weight, ε_ij = W_ij² / [H⁻¹]_jj (SparseGPT Eq. 7), the layer-output error of
     removing it alone with the optimal update of the others;
  2. normalised by the layer's output energy tr(W H Wᵀ) = ||W X||²/n, so layers compare in *relative* error;
  3. each layer l prunes between (s − δ)·n_l and (s + δ)·n_l weights; the remaining K − Σ lower bounds
     zeros go to the globally smallest normalised saliencies. Sorted saliencies make each layer's error
     curve convex, so this greedy choice minimises the summed relative error for the exact total
     K = round(s · Σ n_l) (a discrete water-filling).
The result is a {layer name: sparsity} map for ``prune_linears(..., sparsities=...)`` with any method.
Glossary: s global sparsity · δ spread (max per-layer deviation) · n_l weights of layer l · K total zeros
          · ε OBS saliency.
Left out: the paper's exact sensitivity formula and its interaction with quantization.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from effref.compression.calibration import InputStats, block_linears, find_blocks
from effref.compression.hessian import damped_hessian


def layer_saliency(weight: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01,
                   diag_inv: torch.Tensor | None = None, relative: bool = True) -> torch.Tensor:
    """Sorted (ascending) relative OBS saliencies ε_ij / tr(W H Wᵀ) of one layer, flattened, float32.

    ``diag_inv`` = diag of the damped H⁻¹, when already known (layers reading one input share it).
    """
    H, _ = damped_hessian(hessian, damp)  # (in, in) float64
    if diag_inv is None:
        diag_inv = torch.diagonal(torch.cholesky_inverse(torch.linalg.cholesky(H)))  # (in,) [H⁻¹]_jj
    W = weight.float()  # (out, in)
    energy = (W @ H.float()).mul_(W).sum().double() if relative else 1.0  # tr(W H Wᵀ), one matmul
    return (W.double().pow(2) / diag_inv[None, :] / energy).float().reshape(-1).sort().values  # (out·in,)


def hessian_sensitivity_sparsities(model: nn.Module, stats: Mapping[str, InputStats], sparsity: float,
                                   spread: float = 0.1, damp: float = 0.01, relative: bool = True,
                                   block_ids: Sequence[int] | None = None) -> dict[str, float]:
    """Per-layer sparsities for the block linears of ``model`` whose zeros add up to round(s · Σ n_l) exactly.

    ``stats`` maps each linear's full name to its ``InputStats`` with a hessian (``collect_input_stats``);
    ``relative=False`` ranks raw OBS saliencies instead of relative ones; ``block_ids`` restricts the blocks.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1)")
    if not 0 <= spread <= 1:
        raise ValueError(f"spread={spread} must be in [0, 1] (the largest per-layer deviation from sparsity)")
    prefix, _ = find_blocks(model)
    layers = {f"{prefix}.{i}.{name}": m for i, found in block_linears(model, block_ids=block_ids).items()
              for name, m in found.items()}
    missing = [name for name in layers if name not in stats or stats[name].hessian is None]
    if missing:
        raise ValueError(f"stats lack a hessian for {missing[:3]} (and {max(len(missing) - 3, 0)} more); collect "
                         "them with collect_input_stats(model, calib_batches, needs=('hessian',))")
    sizes = {name: m.weight.numel() for name, m in layers.items()}
    total = round(sparsity * sum(sizes.values()))
    lo = {n: min(max(0, int((sparsity - spread) * k)), k) for n, k in sizes.items()}
    hi = {n: min(k - 1, int((sparsity + spread) * k)) if k > 1 else 0 for n, k in sizes.items()}
    if not sum(lo.values()) <= total <= sum(hi.values()):
        raise ValueError(f"spread={spread} cannot reach the global count {total}; use a larger spread")
    # Candidates: layer l's saliencies ranked lo_l .. hi_l - 1 (already sorted, so any prefix is optimal).
    inverses: dict[int, torch.Tensor] = {}  # id(hessian) -> diag of its damped inverse (q/k/v share one)
    candidates = {}
    for n, m in layers.items():
        H = stats[n].hessian
        if id(H) not in inverses:
            inverses[id(H)] = torch.diagonal(torch.cholesky_inverse(torch.linalg.cholesky(damped_hessian(H, damp)[0])))
        candidates[n] = layer_saliency(m.weight.detach(), H, damp, inverses[id(H)], relative)[lo[n]:hi[n]]
    extra = total - sum(lo.values())
    counts = dict(lo)
    if extra > 0:
        pool = torch.cat(list(candidates.values()))  # (Σ (hi − lo),)
        threshold = pool.kthvalue(extra).values  # the extra-th smallest candidate
        for n, c in candidates.items():
            counts[n] += int((c < threshold).sum())
        left = total - sum(counts.values())  # ties at the threshold, filled in layer order
        for n, c in candidates.items():
            take = min(left, int((c == threshold).sum()))
            counts[n], left = counts[n] + take, left - take
    assert sum(counts.values()) == total
    return {n: counts[n] / sizes[n] for n in layers}
