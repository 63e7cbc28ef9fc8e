"""Deja Vu's sparsity predictors and top-k selection, shared by MLP neurons and attention heads.

Paper: Liu, Wang, Dao, Zhou, Yuan, Song, Shrivastava, Zhang, Tian, Ré, Chen (2023), "Deja Vu: Contextual
Sparsity for Efficient LLMs at Inference Time", arXiv:2310.17157 — §4.2 (learned sparsity predictors).
Implements: a block part that is a sum over n units (the neurons of an MLP, ``dejavu``; the heads of an
attention, ``dejavu_heads``), each unit with an importance c(x) for the part's input x, computes only the k units
of a selected set S(x). S(x) = the top k of a predictor's scores  s(x) = B (A x + a)  (A: r × d, B: n × r, a
rank-r map), fitted to √c(x) on calibration activations by reduced-rank ridge regression (closed form; the paper
trains a small two-layer classifier of the active set with SGD). The oracle S*(x) = top k of c(x) is the best
any predictor can do; recall = |S ∩ S*| / k says how close a predictor comes. ``SparsePart``, the base of the
sparse MLP and attention, picks S(x) by predictor, by oracle or at random.
Glossary: d ``d_model`` · n units (neurons or heads) · k = round(keep · n) units computed per token · r ``rank``
          · λ ``ridge`` · c importance · s predictor scores · recall = |S ∩ S*| / k.
Left out: the asynchronous look-ahead predictors (layer l's input predicting layer l + 1) and the paper's
          classifier trained with SGD on a classification loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

SELECTORS = ("predictor", "oracle", "random")


@dataclass(frozen=True)
class DejaVuConfig:
    rank: int = 64  # r, the predictor's inner width
    ridge: float = 1e-2  # λ relative to the mean squared input: (XᵀX + λ · tr(XᵀX)/d · I) W = Xᵀ Y

    def __post_init__(self) -> None:
        if self.rank < 1 or self.ridge < 0:
            raise ValueError(f"rank={self.rank}, ridge={self.ridge}: need rank >= 1 and ridge >= 0")


def keep_count(keep: float, n: int) -> int:
    """k = round(keep · n) of n neurons or heads, at least one."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep={keep} must lie in (0, 1]; it is the fraction of neurons or heads computed")
    return max(1, round(keep * n))


def mass_fraction(importance: torch.Tensor, mass: float = 0.9) -> torch.Tensor:
    """Per token: the smallest fraction of units whose importance sums to ``mass`` of the total, (...,)."""
    if not 0 < mass <= 1:
        raise ValueError(f"mass={mass} must lie in (0, 1]")
    sorted_c = importance.sort(dim=-1, descending=True).values  # (..., n)
    cum = sorted_c.cumsum(-1) / sorted_c.sum(-1, keepdim=True).clamp_min(1e-30)
    return ((cum < mass).sum(-1) + 1).float() / importance.shape[-1]


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A 0/1 float mask (..., n) with ones at the k largest scores of every row."""
    if not 1 <= k <= scores.shape[-1]:
        raise ValueError(f"k={k} must lie in [1, {scores.shape[-1]}] (the number of neurons or heads)")
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.float32).scatter_(-1, idx, 1.0)


def recall(predicted: torch.Tensor, true: torch.Tensor, k: int) -> float:
    """Mean over tokens of |top_k(predicted) ∩ top_k(true)| / k."""
    if predicted.shape != true.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and true {tuple(true.shape)} scores differ in shape")
    return ((top_k_mask(predicted, k) * top_k_mask(true, k)).sum(-1) / k).mean().item()


class SparsityPredictor(nn.Module):
    """s(x) = B(A x + a): a rank-r affine map from a block part's input (d) to one score per unit (n)."""

    def __init__(self, d_model: int, n_units: int, rank: int):
        super().__init__()
        self.A = nn.Linear(d_model, rank)
        self.B = nn.Linear(rank, n_units, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))  # (..., n)


def predictor_flops(d_model: int, n_units: int, rank: int) -> int:
    """Multiply-add FLOPs per token of a rank-r predictor s(x) = B(A x + a): 2 · r · (d + n); 0 without one."""
    return 2 * rank * (d_model + n_units)


@torch.no_grad()
def train_predictor(x: torch.Tensor, importance: torch.Tensor, config: DejaVuConfig) -> SparsityPredictor:
    """Fit one layer's predictor on calibration inputs x (N, d) to the importances (N, n) of its units.

    Target Y = √c, each row divided by its mean (ranking, not scale, matters), so one predictor serves every k.
    Reduced-rank ridge regression in closed form: the full ridge solution W ((d + 1) × n, a bias row
    appended), then the rank-r truncation W V_rᵀ V_r with V_r the top right singular vectors of the fitted
    values X W, which equal those of Lᵀ W for the Cholesky factor XᵀX + λI = L Lᵀ.
    """
    if x.ndim != 2 or importance.ndim != 2 or x.shape[0] != importance.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and importance {tuple(importance.shape)} must be (N, d), (N, n)")
    d, n = x.shape[1], importance.shape[1]
    if config.rank > min(d + 1, n):
        raise ValueError(f"rank={config.rank} exceeds min(d + 1, n units) = {min(d + 1, n)}")
    X = torch.cat([x, torch.ones_like(x[:, :1])], 1).float()  # (N, d + 1)
    Y = importance.float().sqrt()
    Y = Y / Y.mean(1, keepdim=True).clamp_min(1e-12)  # (N, n)
    G = (X.T @ X).double()  # (d + 1, d + 1); the small solves in float64, the big products in float32
    G += config.ridge * G.diagonal().mean() * torch.eye(d + 1, dtype=G.dtype, device=G.device)
    L = torch.linalg.cholesky(G)
    W = torch.cholesky_solve((X.T @ Y).double(), L)  # (d + 1, n), the ridge solution
    V = torch.linalg.svd(L.T @ W, full_matrices=False).Vh[:config.rank]  # (r, n)
    predictor = SparsityPredictor(d, n, config.rank).to(device=x.device, dtype=x.dtype)
    A = (W @ V.T).to(x.dtype)  # (d + 1, r)
    predictor.A.weight.copy_(A[:-1].T)
    predictor.A.bias.copy_(A[-1])
    predictor.B.weight.copy_(V.T.to(x.dtype))  # (n, r)
    return predictor.eval().requires_grad_(False)


class SparsePart(nn.Module):
    """The base of the sparse MLP (``dejavu.SparseMLP``) and attention (``dejavu_heads.SparseAttention``):
    keep k units per token, chosen by ``selector``."""

    def __init__(self, k: int, selector: str, predictor: SparsityPredictor | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        if selector not in SELECTORS:
            raise ValueError(f"selector={selector!r} is not known; use one of {SELECTORS}")
        if selector == "predictor" and predictor is None:
            raise ValueError("selector='predictor' needs a trained predictor (see dejavu.fit_predictors)")
        self.k, self.selector, self.predictor, self.generator = k, selector, predictor, generator

    def mask(self, x: torch.Tensor, n: int, oracle: Callable[[], torch.Tensor]) -> torch.Tensor:
        """0/1 mask (B, T, n) of the k of n units kept per token; ``oracle()`` gives the true importances."""
        if self.selector == "predictor":
            scores = self.predictor(x)
        elif self.selector == "oracle":
            scores = oracle()
        else:
            scores = torch.rand((*x.shape[:-1], n), generator=self.generator).to(x.device)
        return top_k_mask(scores, self.k).to(x.dtype)
