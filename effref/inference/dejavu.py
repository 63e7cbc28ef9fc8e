"""Deja Vu: contextual sparsity in the MLP and the attention heads, found per token by small predictors.

Paper: Liu, Wang, Dao, Zhou, Yuan, Song, Shrivastava, Zhang, Tian, Ré, Chen (2023), "Deja Vu: Contextual
Sparsity for Efficient LLMs at Inference Time", arXiv:2310.17157 — §3 (contextual sparsity of heads and
neurons), §4.2 (learned sparsity predictors, the sparsified MLP and attention blocks).
Implements: for a SwiGLU MLP  y = Σ_i a_i(x) · W_down[:, i],  a(x) = silu(W_gate x) ⊙ (W_up x),  the importance
of neuron i for token x is the norm of its contribution,  c_i(x) = |a_i(x)| · ‖W_down[:, i]‖,  and the
sparsified MLP computes only the k neurons in a selected set S(x):
  y_S = Σ_{i ∈ S(x)} a_i(x) · W_down[:, i]      (k rows of W_gate and W_up, k columns of W_down).
Attention is a sum over heads too,  o = Σ_h W_O[:, h] y_h  (W_O[:, h] the d_head columns of o_proj that read
head h), so head h's importance for token t is the norm of its contribution,  c_h(t) = ‖W_O[:, h] y_h(t)‖:
Deja Vu skips the heads whose output for a token is small; measuring it after o_proj also counts a head as
small when o_proj shrinks its output. The sparse attention computes only the kept query heads; with grouped
keys and values (GQA) a key/value head is computed when any of the query heads that read it is kept.
S(x) = the top k of a predictor's scores  s(x) = B (A x + a)  (A: r × d, B: n × r, a rank-r map, n = d_ff
neurons or n_heads heads, x the input of the MLP or of the attention), fitted to √c(x) on calibration
activations by reduced-rank ridge regression (closed form; the paper trains a small two-layer classifier of
the active set with SGD). The oracle S*(x) = top k of c(x) is the best any predictor can do. Deja Vu's ReLU
models (OPT) have exact zeros; SwiGLU has none, so here "sparse" means "small contribution".
Glossary: d ``d_model`` · d_ff intermediate neurons · n units (neurons or heads) · k = round(keep · n) units
          computed per token · r ``rank`` · λ ``ridge`` · c importance · s predictor scores
          · recall = |S ∩ S*| / k.
Left out: the asynchronous look-ahead predictors (layer l's input predicting layer l + 1); sparse heads with a
          KV cache (a skipped key/value head leaves a hole that later tokens would read; the paper keeps the
          cache); the fused gather kernels that turn the FLOP saving into wall-clock time. The model-level
          evaluation multiplies by a 0/1 mask, which gives the numbers of the gathered computation (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from effref.models.llama import MLP, Attention, KVCache, Llama, apply_rope
from effref.runtime import progress_bar

SELECTORS = ("predictor", "oracle", "random")
PARTS = ("mlp", "attn")


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


def neuron_activations(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """a(x) = silu(W_gate x) ⊙ W_up x for x (..., d): (..., d_ff)."""
    return F.silu(mlp.gate(x)) * mlp.up(x)


def neuron_importance(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """c_i(x) = |a_i(x)| · ‖W_down[:, i]‖, the norm of neuron i's contribution to the output: (..., d_ff)."""
    return neuron_activations(mlp, x).abs() * mlp.down.weight.norm(dim=0)


def head_outputs(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 heads: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention outputs y_h of query heads ``heads`` (default all) for x (B, T, d): (B, T, k, d_head).

    Only the kept query heads and the key/value heads they read are projected (all heads: the very products
    of ``Attention.forward``, so the result is bit-identical to it).
    """
    B, T, _ = x.shape
    groups = attn.n_heads // attn.n_kv_heads  # query head h reads key/value head h // groups
    if heads is None:
        q, k, v, kv_of_head = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), torch.arange(attn.n_heads, device=x.device) // groups
    else:
        kv, kv_of_head = torch.unique(heads // groups, return_inverse=True)  # needed kv heads; one per query head
        rows = lambda proj, idx: proj.weight.unflatten(0, (-1, attn.d_head))[idx].flatten(0, 1)  # (len · d_head, d)
        q, k, v = F.linear(x, rows(attn.q_proj, heads)), F.linear(x, rows(attn.k_proj, kv)), F.linear(x, rows(
            attn.v_proj, kv))
    q, k, v = (t.view(B, T, -1, attn.d_head).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d_head)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k[:, kv_of_head], v[:, kv_of_head]  # (B, k, T, d_head): the kv head each kept query head reads
    return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1).transpose(1, 2)  # (B, T, k, d_head)


def head_contributions(attn: Attention, y: torch.Tensor) -> torch.Tensor:
    """W_O[:, h] y_h for every head's output y (B, T, n_heads, d_head): (B, T, n_heads, d); their sum is o."""
    w_o = attn.o_proj.weight.view(-1, attn.n_heads, attn.d_head)  # (d, n_heads, d_head)
    return torch.einsum("bthe,dhe->bthd", y, w_o)


def head_importance(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """c_h(t) = ‖W_O[:, h] y_h(t)‖, the norm of head h's contribution to token t's output: (B, T, n_heads)."""
    return head_contributions(attn, head_outputs(attn, x, cos, sin)).norm(dim=-1)


def sparse_attention(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     heads: torch.Tensor) -> torch.Tensor:
    """The attention computing only query heads ``heads`` (k,) for x (B, T, d), one set for the whole input
    (a decoding batch shares it): the k query heads' rows of W_Q and columns of W_O, the needed kv heads' rows
    of W_K and W_V; see ``attention_flops``."""
    if x.ndim != 3 or heads.ndim != 1 or not 1 <= len(heads) <= attn.n_heads or len(set(heads.tolist())) != \
            len(heads) or not 0 <= int(heads.min()) <= int(heads.max()) < attn.n_heads:
        raise ValueError(f"x {tuple(x.shape)} must be (B, T, d) and heads {heads.tolist()} distinct query "
                         f"heads in [0, {attn.n_heads})")
    w_o = attn.o_proj.weight.view(-1, attn.n_heads, attn.d_head)[:, heads].flatten(1)  # (d, k · d_head)
    return F.linear(head_outputs(attn, x, cos, sin, heads).flatten(2), w_o)  # (B, T, d)


def kv_heads_needed(mask: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """How many key/value heads a 0/1 query-head mask (..., n_heads) needs: one per group with a kept head."""
    return mask.unflatten(-1, (n_kv_heads, -1)).amax(-1).sum(-1)  # (...,)


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


def attention_flops(d_model: int, d_head: int, n_heads: int, n_kv_heads: int, k: float, kv_needed: float,
                    context: int, rank: int = 0) -> dict[str, float]:
    """FLOPs per token of attention over ``context`` keys: dense, with k query heads and ``kv_needed`` kv heads
    (means over tokens may be fractional), and the rank-r head predictor. Per query head: W_Q and W_O
    (2 · 2 · d · d_head) and q·K, p·V (2 · 2 · context · d_head); per kv head: W_K and W_V (2 · 2 · d · d_head)."""
    def cost(heads: float, kv: float) -> float:
        return heads * 4 * d_head * (d_model + context) + kv * 4 * d_model * d_head
    return {"dense": cost(n_heads, n_kv_heads), "sparse": cost(k, kv_needed),
            "predictor": 2 * rank * (d_model + n_heads) if rank else 0}


class SparsityPredictor(nn.Module):
    """s(x) = B(A x + a): a rank-r affine map from a block part's input (d) to one score per unit (n)."""

    def __init__(self, d_model: int, n_units: int, rank: int):
        super().__init__()
        self.A = nn.Linear(d_model, rank)
        self.B = nn.Linear(rank, n_units, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))  # (..., n)


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
    inputs = (calib if isinstance(calib, dict) else collect_inputs(model, calib, (part,)))[part]
    return [train_predictor(args[0].flatten(0, 1), importance(getattr(block, part), *args).flatten(0, 1), config)
            for block, args in zip(progress_bar(model.blocks, desc=f"Deja Vu {part} predictors"), inputs)]


class _Sparse(nn.Module):
    """Shared by the sparse MLP and attention: keep k units per token, chosen by ``selector``."""

    def __init__(self, k: int, selector: str, predictor: SparsityPredictor | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        if selector not in SELECTORS:
            raise ValueError(f"selector={selector!r} is not known; use one of {SELECTORS}")
        if selector == "predictor" and predictor is None:
            raise ValueError("selector='predictor' needs a trained predictor (see fit_predictors)")
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


class SparseMLP(_Sparse):
    """A block's MLP restricted to k neurons per token; dense math times a 0/1 mask."""

    def __init__(self, mlp: MLP, k: int, selector: str, predictor: SparsityPredictor | None = None,
                 generator: torch.Generator | None = None):
        super().__init__(k, selector, predictor, generator)
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = neuron_activations(self.mlp, x)  # (B, T, d_ff)
        mask = self.mask(x, a.shape[-1], lambda: a.abs() * self.mlp.down.weight.norm(dim=0))  # (B, T, d_ff)
        return self.mlp.down(a * mask)  # (B, T, d)


class SparseAttention(_Sparse):
    """A block's attention restricted to k query heads per token; every head computed, outputs masked 0/1."""

    def __init__(self, attn: Attention, k: int, selector: str, predictor: SparsityPredictor | None = None,
                 generator: torch.Generator | None = None):
        super().__init__(k, selector, predictor, generator)
        self.attn = attn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        if cache is not None:
            raise ValueError("sparse attention heads run without a KV cache (a skipped kv head would leave a "
                             "hole that later tokens read); call the model without a cache")
        y = head_outputs(self.attn, x, cos, sin)  # (B, T, n_heads, d_head)
        mask = self.mask(x, self.attn.n_heads, lambda: head_contributions(self.attn, y).norm(dim=-1))
        return self.attn.o_proj((y * mask[..., None]).flatten(2))  # (B, T, d)


@contextmanager
def sparsified(model: Llama, keep: float, selector: str = "predictor",
               predictors: list[SparsityPredictor] | None = None, layers: list[int] | None = None,
               seed: int = 0, part: str = "mlp") -> Iterator[Llama]:
    """Within the block, the MLPs (``part="mlp"``) of ``layers`` (default all) compute only round(keep · d_ff)
    neurons per token, or their attentions (``part="attn"``) only round(keep · n_heads) query heads."""
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
