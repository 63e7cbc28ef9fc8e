"""LoSparse: a low-rank part for what neurons share, a sparse residual for what they do not.

Paper: Li, Yu, Zhang, Liang, He, Chen, Zhao (2023), "LoSparse: Structured Compression of Large Language Models
based on Low-Rank and Sparse Approximation", arXiv:2306.11222 — Eq. 1–3 (W = UV + S, SVD initialisation
of UV, pruning of S by importance).
Implements the one-shot version: W ≈ B A + S with
  B A = the rank-r truncated SVD of W (Eq. 2's initialisation; optionally whitened, see lowrank.svd);
  R = W − B A the residual; S keeps the most important entries of R and zeroes the rest (Eq. 3), with
  importance |R_ij| · ||X_j|| when calibration statistics are given (else |R_ij|), either per entry
  (``structure="element"``: S stored as values + flat indices) or per input column (``structure="column"``,
  the paper's structured variant: whole columns of R kept, stored densely with their column indices).
Parameters: r (d_in + d_out) + nnz(S) for "element" (plus the indices), r (d_in + d_out) + d_out · k for
"column" with k kept columns.
Glossary: W (d_out × d_in) · B A low-rank part · S sparse residual · r rank · k kept columns.
Left out: the paper's iterative pruning of S *during fine-tuning* with smoothed sensitivity scores
          |θ ⊙ ∇θ| and its cubic sparsity schedule; knowledge-distillation losses of its experiments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from effref.compression.calibration import InputStats, map_linears
from effref.lowrank.svd import LowRankLinear, cached_factors, rank_for_ratio, truncated_svd

STRUCTURES = ("element", "column")


class LoSparseLinear(nn.Module):
    """y = B A x + S x (+ bias) with S sparse: per-entry (values + flat indices) or per-column (kept columns)."""

    def __init__(self, in_features: int, out_features: int, rank: int, n_sparse: int, structure: str = "element",
                 bias: bool = False):
        super().__init__()
        if structure not in STRUCTURES:
            raise ValueError(f"structure={structure!r} is not known; use one of {STRUCTURES}")
        limit = in_features * out_features if structure == "element" else in_features
        if not 0 <= n_sparse <= limit:
            raise ValueError(f"n_sparse={n_sparse} must be in [0, {limit}] for structure={structure!r}")
        self.in_features, self.out_features, self.structure = in_features, out_features, structure
        self.low_rank = LowRankLinear(in_features, out_features, rank, bias)  # the bias rides on B
        index_dtype = torch.int32 if in_features * out_features < 2**31 else torch.int64
        if structure == "element":
            self.values = nn.Parameter(torch.zeros(n_sparse))  # nonzero entries of S
            self.register_buffer("index", torch.zeros(n_sparse, dtype=index_dtype))  # flat row·d_in + col
        else:
            self.values = nn.Parameter(torch.zeros(out_features, n_sparse))  # kept columns of S
            self.register_buffer("index", torch.zeros(n_sparse, dtype=index_dtype))  # their column numbers

    def sparse_weight(self) -> torch.Tensor:
        """S as a dense (d_out, d_in) matrix (tests, error measurements)."""
        S = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        if self.structure == "element":
            S.view(-1)[self.index.long()] = self.values
        else:
            S[:, self.index.long()] = self.values
        return S

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.low_rank(x)  # (..., d_out)
        if self.structure == "column":
            return out + x[..., self.index.long()] @ self.values.T  # (..., k) @ (k, d_out)
        flat = x.reshape(-1, self.in_features)  # (n, d_in)
        idx = self.index.long()
        S = torch.sparse_coo_tensor(torch.stack([idx // self.in_features, idx % self.in_features]), self.values,
                                    (self.out_features, self.in_features), check_invariants=False,
                                    is_coalesced=True)  # indices are sorted and unique by construction
        return out + torch.sparse.mm(S, flat.T).T.reshape(out.shape)  # S x for every token

    def spec(self) -> dict:
        return {"in": self.in_features, "out": self.out_features, "rank": self.low_rank.rank,
                "n_sparse": self.index.numel(), "structure": self.structure, "bias": self.low_rank.up.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict) -> LoSparseLinear:
        return cls(spec["in"], spec["out"], spec["rank"], spec["n_sparse"], spec["structure"], spec.get("bias", False))


def losparse_factorize(linear: nn.Linear, rank: int, sparse_fraction: float, structure: str = "element",
                       stats: InputStats | None = None, factors: tuple[torch.Tensor, ...] | None = None,
                       ) -> LoSparseLinear:
    """W ≈ B A + S: rank-``rank`` SVD plus the top ``sparse_fraction`` of the residual (entries or columns).

    ``factors``: a previous plain ``svd_factors(W)`` to reuse."""
    if not 0 <= sparse_fraction <= 1:
        raise ValueError(f"sparse_fraction={sparse_fraction} must be in [0, 1] (share of the residual kept)")
    W = linear.weight.detach()
    B, A, _ = truncated_svd(W, rank, factors=factors)
    R = W - B @ A  # (out, in) residual
    x_norm = (stats.sq_mean.sqrt() if stats is not None and stats.sq_mean is not None
              else torch.ones(W.shape[1], device=W.device)).to(R)  # (in,)
    if structure == "element":
        k = round(sparse_fraction * R.numel())
        keep = (R.abs() * x_norm[None, :]).reshape(-1).topk(k).indices.sort().values  # flat indices
        values = R.reshape(-1)[keep]
    else:
        k = round(sparse_fraction * R.shape[1])
        keep = (R.norm(dim=0) * x_norm).topk(k).indices.sort().values  # column indices
        values = R[:, keep]  # (out, k)
    new = LoSparseLinear(W.shape[1], W.shape[0], rank, k, structure, linear.bias is not None).to(
        device=W.device, dtype=W.dtype)
    with torch.no_grad():
        new.low_rank.down.weight.copy_(A)
        new.low_rank.up.weight.copy_(B)
        if linear.bias is not None:
            new.low_rank.up.bias.copy_(linear.bias)
        new.values.copy_(values)
        new.index.copy_(keep.to(new.index.dtype))
    return new


def losparse_compress_model(model: nn.Module, rank_ratio: float, sparse_fraction: float,
                            structure: str = "element", calib_batches: torch.Tensor | None = None,
                            stats: Mapping[str, InputStats] | None = None,
                            target: Callable[[str, nn.Module], bool] | None = None, cache: dict | None = None,
                            **kwargs) -> dict[str, int]:
    """Replace each target block linear by a ``LoSparseLinear``; the rank keeps ``rank_ratio`` of its
    parameters. Activation-weighted importance when ``stats``/``calib_batches`` are given; ``cache`` as in
    ``svd_compress_model`` (plain SVDs, shared with it). {name: rank}."""
    if not 0 <= sparse_fraction <= 1:
        raise ValueError(f"sparse_fraction={sparse_fraction} must be in [0, 1] (share of the residual kept)")
    if structure not in STRUCTURES:
        raise ValueError(f"structure={structure!r} is not known; use one of {STRUCTURES}")
    ranks: dict[str, int] = {}

    def plan_rank(name: str, linear: nn.Linear) -> None:  # before any layer changes
        ranks[name] = rank_for_ratio(linear.out_features, linear.in_features, rank_ratio)

    def layer_fn(name: str, linear: nn.Linear, s: InputStats | None) -> LoSparseLinear:
        factors = cached_factors(cache, name, linear.weight.detach())
        return losparse_factorize(linear, ranks[name], sparse_fraction, structure, s, factors)

    needs = ("sq_mean",) if calib_batches is not None or stats is not None else ()
    map_linears(model, layer_fn, needs, calib_batches, stats, target=target, desc="losparse", check=plan_rank,
                **kwargs)
    return ranks
