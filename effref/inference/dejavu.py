"""Deja Vu: contextual sparsity in the MLP, found per token by a small predictor.

Paper: Liu, Wang, Dao, Zhou, Yuan, Song, Shrivastava, Zhang, Tian, Ré, Chen (2023), "Deja Vu: Contextual
Sparsity for Efficient LLMs at Inference Time", arXiv:2310.17157 — §3 (contextual sparsity), §4.2 (learned
sparsity predictors, the sparsified MLP).
Implements: for a SwiGLU MLP  y = Σ_i a_i(x) · W_down[:, i],  a(x) = silu(W_gate x) ⊙ (W_up x),  the importance
of neuron i for token x is the norm of its contribution,  c_i(x) = |a_i(x)| · ‖W_down[:, i]‖,  and the
sparsified MLP computes only the k neurons in a selected set S(x):
  y_S = Σ_{i ∈ S(x)} a_i(x) · W_down[:, i]      (k rows of W_gate and W_up, k columns of W_down).
S(x) = the top k of a predictor's scores  s(x) = B (A x + a)  (A: r × d, B: d_ff × r, a rank-r map), fitted to
√c(x) on calibration activations by reduced-rank ridge regression (closed form; the paper trains a small
two-layer classifier of the active set with SGD). The oracle S*(x) = top k of
c(x) is the best any predictor can do. Deja Vu's ReLU models (OPT) have exact zeros; SwiGLU has none, so here
"sparse" means "small contribution", and the chapter measures how much of it there is.
Glossary: d ``d_model`` · d_ff intermediate neurons · k = round(keep · d_ff) neurons computed per token
          · r ``rank`` · λ ``ridge`` · c_i neuron importance · s predictor scores · recall = |S ∩ S*| / k.
Left out: sparse attention heads, the asynchronous look-ahead predictors (layer l's input predicting layer
          l + 1), and the fused gather kernels that turn the FLOP saving into wall-clock time; the model-level
          evaluation multiplies by a 0/1 mask, which gives the numbers of the gathered computation (tested).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from effref.models.llama import MLP, Llama
from effref.runtime import progress_bar

SELECTORS = ("predictor", "oracle", "random")


@dataclass(frozen=True)
class DejaVuConfig:
    rank: int = 64  # r, the predictor's inner width
    ridge: float = 1e-2  # λ relative to the mean squared input: (XᵀX + λ · tr(XᵀX)/d · I) W = Xᵀ Y

    def __post_init__(self) -> None:
        if self.rank < 1 or self.ridge < 0:
            raise ValueError(f"rank={self.rank}, ridge={self.ridge}: need rank >= 1 and ridge >= 0")


def keep_count(keep: float, d_ff: int) -> int:
    """k = round(keep · d_ff), at least one neuron."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep={keep} must lie in (0, 1]; it is the fraction of neurons computed")
    return max(1, round(keep * d_ff))


def neuron_activations(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """a(x) = silu(W_gate x) ⊙ W_up x for x (..., d): (..., d_ff)."""
    return F.silu(mlp.gate(x)) * mlp.up(x)


def neuron_importance(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """c_i(x) = |a_i(x)| · ‖W_down[:, i]‖, the norm of neuron i's contribution to the output: (..., d_ff)."""
    return neuron_activations(mlp, x).abs() * mlp.down.weight.norm(dim=0)


def mass_fraction(importance: torch.Tensor, mass: float = 0.9) -> torch.Tensor:
    """Per token: the smallest fraction of neurons whose importance sums to ``mass`` of the total, (...,)."""
    if not 0 < mass <= 1:
        raise ValueError(f"mass={mass} must lie in (0, 1]")
    sorted_c = importance.sort(dim=-1, descending=True).values  # (..., d_ff)
    cum = sorted_c.cumsum(-1) / sorted_c.sum(-1, keepdim=True).clamp_min(1e-30)
    return ((cum < mass).sum(-1) + 1).float() / importance.shape[-1]


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A 0/1 float mask (..., d_ff) with ones at the k largest scores of every row."""
    if not 1 <= k <= scores.shape[-1]:
        raise ValueError(f"k={k} must lie in [1, {scores.shape[-1]}] (the number of neurons)")
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.float32).scatter_(-1, idx, 1.0)


def recall(predicted: torch.Tensor, true: torch.Tensor, k: int) -> float:
    """Mean over tokens of |top_k(predicted) ∩ top_k(true)| / k."""
    if predicted.shape != true.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and true {tuple(true.shape)} scores differ in shape")
    return ((top_k_mask(predicted, k) * top_k_mask(true, k)).sum(-1) / k).mean().item()


def sparse_mlp(mlp: MLP, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The MLP computing only neurons idx (N, k) for tokens x (N, d): gathers k rows of W_gate, W_up and
    k columns of W_down per token, 3 · 2 · d · k FLOPs instead of 3 · 2 · d · d_ff."""
    if x.ndim != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} must be (N, d) and idx {tuple(idx.shape)} (N, k)")
    gate_rows, up_rows = mlp.gate.weight[idx], mlp.up.weight[idx]  # (N, k, d) each
    down_cols = mlp.down.weight.T[idx]  # (N, k, d)
    a = F.silu(torch.einsum("nkd,nd->nk", gate_rows, x)) * torch.einsum("nkd,nd->nk", up_rows, x)  # (N, k)
    return torch.einsum("nk,nkd->nd", a, down_cols)  # (N, d)


def mlp_flops(d_model: int, d_ff: int, k: int, rank: int = 0) -> dict[str, int]:
    """Multiply-add FLOPs per token of the dense MLP, the sparse one on k neurons, and the rank-r predictor."""
    return {"dense": 2 * 3 * d_model * d_ff, "sparse": 2 * 3 * d_model * k,
            "predictor": 2 * rank * (d_model + d_ff) if rank else 0}


class SparsityPredictor(nn.Module):
    """s(x) = B(A x + a): a rank-r affine map from the MLP input (d) to one score per neuron (d_ff)."""

    def __init__(self, d_model: int, d_ff: int, rank: int):
        super().__init__()
        self.A = nn.Linear(d_model, rank)
        self.B = nn.Linear(rank, d_ff, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))  # (..., d_ff)


@torch.no_grad()
def train_predictor(x: torch.Tensor, importance: torch.Tensor, config: DejaVuConfig) -> SparsityPredictor:
    """Fit one layer's predictor on calibration inputs x (N, d) to the importances (N, d_ff) of its neurons.

    Target Y = √c, each row divided by its mean (ranking, not scale, matters), so one predictor serves every k.
    Reduced-rank ridge regression in closed form: the full ridge solution W ((d + 1) × d_ff, a bias row
    appended), then the rank-r truncation W V_rᵀ V_r with V_r the top right singular vectors of the fitted
    values X W, which equal those of Lᵀ W for the Cholesky factor XᵀX + λI = L Lᵀ.
    """
    if x.ndim != 2 or importance.ndim != 2 or x.shape[0] != importance.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and importance {tuple(importance.shape)} must be (N, d), (N, d_ff)")
    d, d_ff = x.shape[1], importance.shape[1]
    if config.rank > min(d + 1, d_ff):
        raise ValueError(f"rank={config.rank} exceeds min(d + 1, d_ff) = {min(d + 1, d_ff)}")
    X = torch.cat([x, torch.ones_like(x[:, :1])], 1).float()  # (N, d + 1)
    Y = importance.float().sqrt()
    Y = Y / Y.mean(1, keepdim=True).clamp_min(1e-12)  # (N, d_ff)
    G = (X.T @ X).double()  # (d + 1, d + 1); the small solves in float64, the big products in float32
    G += config.ridge * G.diagonal().mean() * torch.eye(d + 1, dtype=G.dtype, device=G.device)
    L = torch.linalg.cholesky(G)
    W = torch.cholesky_solve((X.T @ Y).double(), L)  # (d + 1, d_ff), the ridge solution
    V = torch.linalg.svd(L.T @ W, full_matrices=False).Vh[:config.rank]  # (r, d_ff)
    predictor = SparsityPredictor(d, d_ff, config.rank).to(device=x.device, dtype=x.dtype)
    A = (W @ V.T).to(x.dtype)  # (d + 1, r)
    predictor.A.weight.copy_(A[:-1].T)
    predictor.A.bias.copy_(A[-1])
    predictor.B.weight.copy_(V.T.to(x.dtype))  # (d_ff, r)
    return predictor.eval().requires_grad_(False)


@torch.no_grad()
def collect_mlp_inputs(model: Llama, ids: torch.Tensor) -> list[torch.Tensor]:
    """Run ids (B, T) through the model and return every block's MLP input, flattened to (B · T, d)."""
    inputs: list[torch.Tensor] = []
    hooks = [b.mlp.register_forward_pre_hook(lambda m, args: inputs.append(args[0].flatten(0, 1)))
             for b in model.blocks]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return inputs


@torch.no_grad()
def fit_predictors(model: Llama, calib_ids: torch.Tensor, config: DejaVuConfig) -> list[SparsityPredictor]:
    """One predictor per block, trained on the MLP inputs that calibration ids (B, T) produce."""
    inputs = collect_mlp_inputs(model, calib_ids)
    return [train_predictor(x, neuron_importance(block.mlp, x), config)
            for block, x in zip(progress_bar(model.blocks, desc="Deja Vu predictors"), inputs)]


class SparseMLP(nn.Module):
    """A block's MLP restricted to k neurons per token, chosen by ``selector``; dense math times a 0/1 mask."""

    def __init__(self, mlp: MLP, k: int, selector: str, predictor: SparsityPredictor | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        if selector not in SELECTORS:
            raise ValueError(f"selector={selector!r} is not known; use one of {SELECTORS}")
        if selector == "predictor" and predictor is None:
            raise ValueError("selector='predictor' needs a trained predictor (see fit_predictors)")
        self.mlp, self.k, self.selector, self.predictor, self.generator = mlp, k, selector, predictor, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = neuron_activations(self.mlp, x)  # (B, T, d_ff)
        if self.selector == "predictor":
            scores = self.predictor(x)
        elif self.selector == "oracle":
            scores = a.abs() * self.mlp.down.weight.norm(dim=0)
        else:
            scores = torch.rand(a.shape, generator=self.generator).to(a.device)
        return self.mlp.down(a * top_k_mask(scores, self.k).to(a.dtype))  # (B, T, d)


@contextmanager
def sparsified(model: Llama, keep: float, selector: str = "predictor",
               predictors: list[SparsityPredictor] | None = None, layers: list[int] | None = None,
               seed: int = 0) -> Iterator[Llama]:
    """Within the block, the MLPs of ``layers`` (default all) compute only round(keep · d_ff) neurons."""
    layers = list(range(len(model.blocks))) if layers is None else layers
    if predictors is not None and len(predictors) != len(model.blocks):
        raise ValueError(f"{len(predictors)} predictors for {len(model.blocks)} blocks; fit one per block")
    k = keep_count(keep, model.cfg.d_ff)
    generator = torch.Generator().manual_seed(seed)
    originals = {i: model.blocks[i].mlp for i in layers}
    try:
        for i in layers:
            model.blocks[i].mlp = SparseMLP(originals[i], k, selector, predictors[i] if predictors else None,
                                            generator)
        yield model
    finally:
        for i, mlp in originals.items():
            model.blocks[i].mlp = mlp
