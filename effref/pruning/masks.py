"""What every unstructured pruning method shares: the sparsity target, mask selection, the model driver.

Papers: the N:M pattern of NVIDIA's sparse tensor cores (Mishra et al., 2021, arXiv:2104.08378); the
per-output comparison group of Wanda (Sun et al., 2023, arXiv:2306.11695, §3); SparseGPT's per-block masks
(Frantar & Alistarh, 2023, arXiv:2301.00774, §3.3).
Implements: ``PruneConfig`` (a sparsity fraction s in [0, 1), or an N:M pattern = keep N of every M
consecutive inputs of a row, s = 1 − N/M); ``prune_mask(scores, cfg, group)`` = the lowest-scoring weights,
counted exactly: k = round(s · numel) weights per layer, split over comparison groups (the whole layer,
each row, or each column block) by largest remainder, so the layer count is exact whatever the group;
``prune_linears`` runs a method's layer function over a model (per-layer sparsities allowed) and
``sparsity_report`` counts zeros per layer and overall.
Glossary: s sparsity (fraction of zeros) · N kept of every M inputs · k weights pruned in a layer
          · mask True = pruned (set to zero).
Left out: block sparsity; the 2:4 storage format and its sparse matmul live in ``kernels/sparse24.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from effref.checks import config_or_default
from effref.compression.calibration import InputStats, block_linears, find_blocks, map_linears

GROUPS = ("layer", "row")


@dataclass
class PruneConfig:
    """Unstructured sparsity (``sparsity``, default 0.5) or semi-structured N:M (``nm="2:4"`` or ``(2, 4)``),
    whose sparsity is 1 - N/M (a different ``sparsity`` beside it is refused)."""

    sparsity: float | None = None
    nm: tuple[int, int] | str | None = None

    def __post_init__(self) -> None:
        if self.nm is not None:
            if isinstance(self.nm, str):
                parts = self.nm.split(":")
                if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                    raise ValueError(f"nm={self.nm!r} is not an N:M pattern; write it like '2:4'")
                self.nm = (int(parts[0]), int(parts[1]))
            n, m = self.nm
            if not (isinstance(n, int) and isinstance(m, int)) or n < 1 or m < 1:
                raise ValueError(f"nm={self.nm} needs positive integers N and M, e.g. (2, 4)")
            if n > m:
                raise ValueError(f"nm={n}:{m} asks to keep N={n} of every M={m} weights, more than there are; "
                                 "N must be <= M, e.g. '2:4'")
            if self.sparsity is not None and self.sparsity != 1 - n / m:
                raise ValueError(f"sparsity={self.sparsity!r} contradicts nm={n}:{m}, which zeroes {m - n} of "
                                 f"every {m} weights (sparsity {1 - n / m:g}); pass only one of them")
            self.sparsity = 1 - n / m
        elif self.sparsity is None:
            self.sparsity = 0.5
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity={self.sparsity!r} must be in [0, 1) (the fraction of weights set to zero)")

    def describe(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{self.sparsity:.0%} unstructured"

    def check_shape(self, weight: torch.Tensor) -> None:
        """Raise if an N:M pattern does not tile the rows of ``weight`` (in_features % M != 0)."""
        if weight.ndim != 2:
            raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
        if self.nm and weight.shape[1] % self.nm[1]:
            raise ValueError(f"nm={self.nm[0]}:{self.nm[1]} needs in_features divisible by M={self.nm[1]}, "
                             f"got a weight of shape {tuple(weight.shape)}; choose M dividing {weight.shape[1]}")


def split_count(k: int, sizes: list[int]) -> list[int]:
    """Split k items over groups proportionally to ``sizes`` (largest remainder): the counts sum to k."""
    total = sum(sizes)
    exact = [k * s / total for s in sizes]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: counts[i] - exact[i])[:k - sum(counts)]:
        counts[i] += 1
    return counts


def lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k smallest entries of ``scores`` (ties broken by position, deterministic)."""
    flat = scores.reshape(-1)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = flat.kthvalue(k).values  # the k-th smallest score: O(n), no full sort
    mask = flat < kth
    ties = torch.nonzero(flat == kth).flatten()[:k - int(mask.sum())]  # fill up with ties, lowest index first
    mask[ties] = True
    return mask.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the M − N lowest scores of every M consecutive entries along the last dim: exactly N:M."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)  # (rows, cols/M, M)
    order = torch.argsort(groups, dim=-1, stable=True)[..., :m - n]  # the M − N smallest of each group
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return mask.reshape(rows, cols)


def prune_mask(scores: torch.Tensor, cfg: PruneConfig, group: str = "layer") -> torch.Tensor:
    """Mask (True = prune) of the lowest ``scores`` (out, in): N:M per row, or exactly round(s·numel) weights.

    ``group`` is the comparison group of unstructured pruning: the whole layer, or each output row (Wanda).
    """
    cfg.check_shape(scores)
    if group not in GROUPS:
        raise ValueError(f"group={group!r} is not known; use one of {GROUPS}")
    if cfg.nm:
        return nm_mask(scores, *cfg.nm)
    k = round(cfg.sparsity * scores.numel())
    if group == "layer":
        return lowest(scores, k)
    rows, cols = scores.shape
    counts = torch.tensor(split_count(k, [cols] * rows), device=scores.device)  # (out,) row counts differ by ≤ 1
    order = torch.argsort(scores, dim=1, stable=True)  # (out, in) each row's inputs, lowest score first
    ranked = torch.arange(cols, device=scores.device)[None, :] < counts[:, None]  # (out, in) True = prune
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, ranked)


# method(weight (out, in), stats, cfg) -> (pruned weight, mask); it never changes its input.
LayerPruner = Callable[[torch.Tensor, "InputStats | None", PruneConfig], tuple[torch.Tensor, torch.Tensor]]


def prune_linears(model: nn.Module, method: LayerPruner, cfg: PruneConfig, needs: tuple[str, ...] = (),
                  calib_batches: torch.Tensor | None = None, stats: Mapping[str, InputStats] | None = None,
                  sparsities: Mapping[str, float] | None = None, progress: bool = True, desc: str = "pruning",
                  **walk_kwargs) -> dict[str, torch.Tensor]:
    """Prune the linears of ``model``'s blocks in place with ``method``; return {name: mask}.

    Statistics come either from a sequential calibration walk over ``calib_batches`` (the papers' scheme) or
    from ``stats`` collected beforehand (``collect_input_stats``: one dense pass shared by many runs).
    ``sparsities`` {name: s} overrides ``cfg.sparsity`` per layer (mixed sparsity); every other layer uses cfg.
    """
    cfg = config_or_default(cfg, PruneConfig, "PruneConfig(sparsity=0.5)")
    masks: dict[str, torch.Tensor] = {}

    def config_for(name: str) -> PruneConfig:
        return cfg if not sparsities or name not in sparsities else replace(cfg, sparsity=sparsities[name], nm=None)

    def check(name: str, linear: nn.Linear) -> None:  # every layer, before the first one is pruned
        config_for(name).check_shape(linear.weight)

    def layer_fn(name: str, linear: nn.Linear, s: InputStats | None) -> None:
        layer_cfg = config_for(name)
        weight, mask = method(linear.weight.data, s, layer_cfg)
        linear.weight.data.copy_(weight)
        masks[name] = mask

    map_linears(model, layer_fn, needs, calib_batches, stats, progress=progress, desc=desc, check=check,
                **walk_kwargs)
    return masks


def sparsity_report(model: nn.Module, **kwargs) -> tuple[dict[str, float], float]:
    """({block linear name: fraction of exact zeros}, global fraction over all of them)."""
    prefix, _ = find_blocks(model)
    per, zeros, total = {}, 0, 0
    for i, linears in block_linears(model, **kwargs).items():
        for name, linear in linears.items():
            z = int((linear.weight == 0).sum())
            per[f"{prefix}.{i}.{name}"] = z / linear.weight.numel()
            zeros, total = zeros + z, total + linear.weight.numel()
    return per, zeros / total
