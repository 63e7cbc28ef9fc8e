"""Deja Vu: contextual sparsity in the MLP and the attention heads, found per token by small predictors.

Paper: Liu, Wang, Dao, Zhou, Yuan, Song, Shrivastava, Zhang, Tian, Ré, Chen (2023), "Deja Vu: Contextual
Sparsity for Efficient LLMs at Inference Time", arXiv:2310.17157 — §3 (contextual sparsity of heads and
neurons), §4.2 (learned sparsity predictors, the sparsified MLP and attention blocks).
Implements: for a gated MLP  y = Σ_i a_i(x) · W_down[:, i],  a(x) = act(W_gate x) ⊙ (W_up x)  (act: silu for
SwiGLU, tanh-gelu for Gemma's GeGLU),  the importance of neuron i for token x is the norm of its contribution,
  c_i(x) = |a_i(x)| · ‖W_down[:, i]‖,
and the sparsified MLP computes only the k neurons in a selected set S(x):
  y_S = Σ_{i ∈ S(x)} a_i(x) · W_down[:, i]      (k rows of W_gate and W_up, k columns of W_down).
S(x) is the top k of a low-rank predictor's scores, of the true importances (the oracle) or a random set
(``dejavu_predictor``); attention heads are the same story with head importances (``dejavu_heads``). This
module holds the MLP part and the model level for both: collect a block part's inputs in one forward, fit one
predictor per block, and swap in the sparse MLPs or attentions within ``sparsified(..., part=...)``. Deja Vu's
ReLU models (OPT) have exact zeros; SwiGLU and GeGLU have none, so here "sparse" means "small contribution".
Glossary: d ``d_model`` · d_ff intermediate neurons · a neuron activations · c importance · k = round(keep · n)
          units (neurons or heads) computed per token · S(x) the kept set.
Left out: the fused gather kernels that turn the FLOP saving into wall-clock time. The model-level evaluation
          multiplies by a 0/1 mask, which gives the numbers of the gathered computation (``sparse_mlp``, tested).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from effref.inference.dejavu_heads import SparseAttention, head_importance
from effref.inference.dejavu_predictor import (
    DejaVuConfig,
    SparsePart,
    SparsityPredictor,
    keep_count,
    predictor_flops,
    train_predictor,
)
from effref.models.llama import MLP, Attention, Llama, require_llama
from effref.runtime import progress_bar

PARTS = ("mlp", "attn")


def neuron_activations(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """a(x) = act(W_gate x) ⊙ W_up x for x (..., d): (..., d_ff)."""
    return mlp.act(mlp.gate(x)) * mlp.up(x)


def neuron_importance(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """c_i(x) = |a_i(x)| · ‖W_down[:, i]‖, the norm of neuron i's contribution to the output: (..., d_ff)."""
    return neuron_activations(mlp, x).abs() * mlp.down.weight.norm(dim=0)


def sparse_mlp(mlp: MLP, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The MLP computing only neurons idx (N, k) for tokens x (N, d): gathers k rows of W_gate, W_up and
    k columns of W_down per token, 3 · 2 · d · k FLOPs instead of 3 · 2 · d · d_ff."""
    if x.ndim != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} must be (N, d) and idx {tuple(idx.shape)} (N, k)")
    gate_rows, up_rows = mlp.gate.weight[idx], mlp.up.weight[idx]  # (N, k, d) each
    down_cols = mlp.down.weight.T[idx]  # (N, k, d)
    a = mlp.act(torch.einsum("nkd,nd->nk", gate_rows, x)) * torch.einsum("nkd,nd->nk", up_rows, x)  # (N, k)
    return torch.einsum("nk,nkd->nd", a, down_cols)  # (N, d)


def mlp_flops(d_model: int, d_ff: int, k: int, rank: int = 0) -> dict[str, int]:
    """Multiply-add FLOPs per token of the dense MLP, the sparse one on k neurons, and the rank-r predictor."""
    return {"dense": 2 * 3 * d_model * d_ff, "sparse": 2 * 3 * d_model * k,
            "predictor": predictor_flops(d_model, d_ff, rank)}


class SparseMLP(SparsePart):
    """A block's MLP restricted to k neurons per token; dense math times a 0/1 mask."""

    def __init__(self, mlp: MLP, k: int, selector: str, predictor: SparsityPredictor | None = None,
                 generator: torch.Generator | None = None):
        super().__init__(k, selector, predictor, generator)
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = neuron_activations(self.mlp, x)  # (B, T, d_ff)
        mask = self.mask(x, a.shape[-1], lambda: a.abs() * self.mlp.down.weight.norm(dim=0))  # (B, T, d_ff)
        return self.mlp.down(a * mask)  # (B, T, d)


def importance(module: MLP | Attention, x: torch.Tensor, *rope: torch.Tensor) -> torch.Tensor:
    """Neuron importance of an MLP, or head importance of an attention (which needs the rope cos, sin)."""
    return neuron_importance(module, x) if isinstance(module, MLP) else head_importance(module, x, *rope)


@torch.no_grad()
def collect_inputs(model: Llama, ids: torch.Tensor, parts: tuple[str, ...] = ("mlp",)
                   ) -> dict[str, list[tuple[torch.Tensor, ...]]]:
    """One forward of ids (B, T); for each of ``parts``, every block's inputs: (x,) for "mlp", x (B, T, d), and
    (x, cos, sin) for "attn" (x before the attention, after its norm)."""
    if not parts or any(part not in PARTS for part in parts):
        raise ValueError(f"parts={parts!r}: use a non-empty tuple drawn from {PARTS}")
    inputs: dict[str, list[tuple[torch.Tensor, ...]]] = {part: [] for part in parts}
    hooks = [getattr(b, part).register_forward_pre_hook(lambda m, args, part=part: inputs[part].append(args[:3]))
             for part in parts for b in model.blocks]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return inputs


@torch.no_grad()
def fit_predictors(model: Llama, calib: torch.Tensor | dict[str, list[tuple[torch.Tensor, ...]]],
                   config: DejaVuConfig, part: str = "mlp") -> list[SparsityPredictor]:
    """One predictor per block for its MLP neurons or attention heads (``part``), trained on calibration ids
    (B, T) or on the inputs ``collect_inputs`` gathered from them (one forward serves both parts)."""
    require_llama(model, "model")
    inputs = (calib if isinstance(calib, dict) else collect_inputs(model, calib, (part,)))[part]
    return [train_predictor(args[0].flatten(0, 1), importance(getattr(block, part), *args).flatten(0, 1), config)
            for block, args in zip(progress_bar(model.blocks, desc=f"Deja Vu {part} predictors"), inputs)]


@contextmanager
def sparsified(model: Llama, keep: float, selector: str = "predictor",
               predictors: list[SparsityPredictor] | None = None, layers: list[int] | None = None,
               seed: int = 0, part: str = "mlp") -> Iterator[Llama]:
    """Within the block, the MLPs (``part="mlp"``) of ``layers`` (default all) compute only round(keep · d_ff)
    neurons per token, or their attentions (``part="attn"``) only round(keep · n_heads) query heads."""
    require_llama(model, "model")
    if part not in PARTS:
        raise ValueError(f"part={part!r} is not known; use one of {PARTS}")
    layers = list(range(len(model.blocks))) if layers is None else layers
    if predictors is not None and len(predictors) != len(model.blocks):
        raise ValueError(f"{len(predictors)} predictors for {len(model.blocks)} blocks; fit one per block")
    k = keep_count(keep, model.cfg.d_ff if part == "mlp" else model.cfg.n_heads)
    sparse = SparseMLP if part == "mlp" else SparseAttention
    generator = torch.Generator().manual_seed(seed)
    originals = {i: getattr(model.blocks[i], part) for i in layers}
    try:
        for i in layers:
            setattr(model.blocks[i], part, sparse(originals[i], k, selector, predictors[i] if predictors else None,
                                                  generator))
        yield model
    finally:
        for i, module in originals.items():
            setattr(model.blocks[i], part, module)
