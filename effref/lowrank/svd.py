"""Truncated SVD of linear layers, plain and activation-aware (whitened by calibration statistics).

Papers: Eckart & Young (1936) for the optimality of the truncated SVD; the whitening of SVD-LLM (Wang, Zheng,
Wan, Zhang, 2024, arXiv:2403.07378, §3.1 "truncation-aware data whitening"); ASVD (Yuan et al., 2023,
arXiv:2312.05821) for the activation-aware idea. Survey §2.1.3: W ≈ U Vᵀ with rank r ≪ min(m, n).
Implements, for a layer W (d_out × d_in):
  plain:      W = U Σ Vᵀ,  Ŵ = U_r Σ_r V_rᵀ, minimising ||W − Ŵ||_F; the error is sqrt(Σ_{i>r} σ_i²) (Eckart–Young);
  whitened:   H = XᵀX / n = S Sᵀ (Cholesky of the damped calibration Hessian), W S = U Σ Vᵀ,
              Ŵ = U_r Σ_r V_rᵀ S⁻¹, minimising the output error ||(W − Ŵ) Xᵀ||_F² / n = Σ_{i>r} σ_i(W S)²;
stored as two linears, ``down`` (A = V_rᵀ, or V_rᵀ S⁻¹ when whitened: r × d_in) then ``up``
(B = U_r Σ_r: d_out × r): r · (d_in + d_out) parameters instead of d_in · d_out, and fewer FLOPs
when r < d_in · d_out / (d_in + d_out).
Glossary: r rank · σ_i singular values · S lower Cholesky factor of H · A, B the two factors (Ŵ = B A).
Left out: per-layer rank search (SVD-LLM's and ASVD's sensitivity-based rank allocation), the
          closed-form parameter update of SVD-LLM §3.2.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from effref.compression.calibration import InputStats, map_linears
from effref.compression.hessian import damped_hessian


class LowRankLinear(nn.Module):
    """y = up(down(x)) = B A x (+ bias): a rank-r stand-in for an nn.Linear."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False):
        super().__init__()
        check_rank(rank, out_features, in_features)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)  # A: (r, d_in)
        self.up = nn.Linear(rank, out_features, bias=bias)  # B: (d_out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))  # (..., d_in) -> (..., r) -> (..., d_out)

    def weight_product(self) -> torch.Tensor:
        return self.up.weight @ self.down.weight  # (d_out, d_in) = B A

    def spec(self) -> dict:
        return {"in": self.in_features, "out": self.out_features, "rank": self.rank, "bias": self.up.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict) -> LowRankLinear:
        return cls(spec["in"], spec["out"], spec["rank"], spec["bias"])


def check_rank(rank: int, rows: int, cols: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(rows, cols):
        raise ValueError(f"rank={rank!r} must be an integer in [1, min(rows, cols)] = [1, {min(rows, cols)}] for "
                         f"a {rows} × {cols} matrix; a larger rank cannot be represented, use a smaller one")


def rank_for_ratio(rows: int, cols: int, ratio: float) -> int:
    """The rank whose two factors hold about ``ratio`` of a rows × cols matrix's parameters (at least 1)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio={ratio} must be in (0, 1] (the fraction of the layer's parameters kept)")
    return max(1, min(min(rows, cols), int(ratio * rows * cols / (rows + cols))))


def svd_factors(weight: torch.Tensor, hessian: torch.Tensor | None = None, damp: float = 0.01,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full-rank factors (B = U Σ (out, k), A = Vᵀ or Vᵀ S⁻¹ (k, in), σ (k,)), float64, k = min(out, in).

    Any rank r is then the slice (B[:, :r], A[:r]): one SVD serves a whole sweep of ranks.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    W = weight.double()  # (out, in)
    if hessian is None:
        U, sigma, Vh = torch.linalg.svd(W, full_matrices=False)  # W = U Σ Vᵀ
        return U * sigma, Vh, sigma
    if hessian.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({W.shape[1]}, {W.shape[1]}) "
                         "for this layer's inputs")
    S = torch.linalg.cholesky(damped_hessian(hessian.to(W.device), damp)[0])  # (in, in) lower, H = S Sᵀ
    U, sigma, Vh = torch.linalg.svd(W @ S, full_matrices=False)  # W S = U Σ Vᵀ
    return U * sigma, torch.linalg.solve_triangular(S, Vh, upper=False, left=False), sigma  # A S = Vᵀ


def cached_factors(cache: dict | None, name: str, weight: torch.Tensor, hessian: torch.Tensor | None = None,
                   damp: float = 0.01) -> tuple[torch.Tensor, ...] | None:
    """``svd_factors`` memoised in ``cache`` under (name, whitened?, damp); None when ``cache`` is None."""
    if cache is None:
        return None
    key = (name, hessian is not None, damp if hessian is not None else None)
    if key not in cache:
        cache[key] = svd_factors(weight, hessian, damp)
    return cache[key]


def truncated_svd(weight: torch.Tensor, rank: int, hessian: torch.Tensor | None = None, damp: float = 0.01,
                  factors: tuple[torch.Tensor, ...] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B (out, r), A (r, in), σ all singular values): Ŵ = B A; whitened by ``hessian`` (in, in) if given.

    ``factors`` = a previous ``svd_factors`` result for the same weight, to skip the SVD.
    """
    check_rank(rank, *weight.shape)
    B, A, sigma = factors if factors is not None else svd_factors(weight, hessian, damp)
    return B[:, :rank].to(weight.dtype), A[:rank].to(weight.dtype), sigma


def svd_factorize(linear: nn.Linear, rank: int, stats: InputStats | None = None, damp: float = 0.01,
                  factors: tuple[torch.Tensor, ...] | None = None) -> LowRankLinear:
    """A ``LowRankLinear`` approximating ``linear``: plain SVD, or whitened when ``stats`` has a hessian."""
    B, A, _ = truncated_svd(linear.weight.detach(), rank, None if stats is None else stats.hessian, damp, factors)
    new = LowRankLinear(linear.in_features, linear.out_features, rank, linear.bias is not None)
    new = new.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.down.weight.copy_(A)
        new.up.weight.copy_(B)
        if linear.bias is not None:
            new.up.bias.copy_(linear.bias)
    return new


def svd_compress_model(model: nn.Module, ratio: float, whiten: bool = False,
                       calib_batches: torch.Tensor | None = None, stats: Mapping[str, InputStats] | None = None,
                       target: Callable[[str, nn.Module], bool] | None = None, damp: float = 0.01,
                       rank_of: Mapping[str, int] | None = None, cache: dict | None = None,
                       **kwargs) -> dict[str, int]:
    """Replace each target linear of the decoder blocks by a ``LowRankLinear`` keeping ``ratio`` of its
    parameters (rank from ``rank_for_ratio``, or ``rank_of[name]`` when given); whitened SVD if ``whiten``
    (needs ``calib_batches`` or ``stats``). ``cache`` (a dict kept by the caller) memoises each layer's full
    SVD, so a sweep over ratios on the same dense weights pays for one SVD per layer. Returns {name: rank}."""
    ranks: dict[str, int] = {}

    def plan_rank(name: str, linear: nn.Linear) -> None:  # every layer's rank, checked before any layer changes
        ranks[name] = (rank_of or {}).get(name) or rank_for_ratio(linear.out_features, linear.in_features, ratio)
        check_rank(ranks[name], linear.out_features, linear.in_features)

    def layer_fn(name: str, linear: nn.Linear, s: InputStats | None) -> LowRankLinear:
        hessian = s.hessian if whiten and s is not None else None
        factors = cached_factors(cache, name, linear.weight.detach(), hessian, damp)
        return svd_factorize(linear, ranks[name], s if whiten else None, damp, factors)

    map_linears(model, layer_fn, ("hessian",) if whiten else (), calib_batches, stats, target=target,
                desc="svd", check=plan_rank, **kwargs)
    return ranks
