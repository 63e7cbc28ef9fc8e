"""TensorGPT: every token embedding stored as a small tensor train (matrix product state).

Paper: Xu, Xu, Mandic (2023), "TensorGPT: Efficient Compression of the Embedding Layer in LLMs based on the
Tensor-Train Decomposition", arXiv:2307.00526 — §3; TT-SVD from Oseledets (2011), "Tensor-Train
Decomposition", SIAM J. Sci. Comput. 33(5), Algorithm 1.
Implements: each row e ∈ R^D of the embedding table (D = d_1 · … · d_k) is reshaped into a k-way tensor
and decomposed by TT-SVD into cores G_t ∈ R^{r_{t-1} × d_t × r_t} (r_0 = r_k = 1):
  e[i_1, …, i_k] = G_1[:, i_1, :] G_2[:, i_2, :] … G_k[:, i_k, :].
TT-SVD: unfold, SVD, keep r_t singular triplets, pass Σ Vᵀ on to the next unfolding. The truncations are
orthogonal to each other, so ||e − ê||² is exactly the sum of the discarded σ² of every step, and with full
ranks (r_t = min(r_{t-1} d_t, d_{t+1} ⋯ d_k)) the reconstruction is exact. A lookup contracts only the cores
of the requested tokens — the table is never materialised. Parameters: V · Σ_t r_{t-1} d_t r_t instead of V · D.
Glossary: V vocabulary · D embedding width · d_t mode sizes · r_t TT ranks · G_t cores.
Left out: the paper's distributed computation; TT-matrix formats that share cores across tokens
          (Khrulkov et al., 2019, "Tensorized Embedding Layers"); the output head, which stays dense.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def check_tt_shape(dim: int, dims: tuple[int, ...], ranks: tuple[int, ...]) -> None:
    """Raise unless ∏ dims = dim and every rank is in [1, its largest possible value]."""
    if len(dims) < 2 or math.prod(dims) != dim or any(d < 1 for d in dims):
        raise ValueError(f"dims={tuple(dims)} must have >= 2 positive factors whose product is the embedding "
                         f"width {dim}, e.g. (8, 8, 9) for 576")
    if len(ranks) != len(dims) - 1:
        raise ValueError(f"ranks={tuple(ranks)} must hold len(dims) - 1 = {len(dims) - 1} values (r_1 … r_(k-1))")
    r_prev = 1
    for t, r in enumerate(ranks):
        largest = min(r_prev * dims[t], math.prod(dims[t + 1:]))
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= largest:
            raise ValueError(f"ranks[{t}]={r!r} must be in [1, {largest}] (the unfolding is {r_prev * dims[t]} × "
                             f"{math.prod(dims[t + 1:])}); a larger rank than the matrix has cannot be used")
        r_prev = r


def tt_svd(rows: torch.Tensor, dims: tuple[int, ...], ranks: tuple[int, ...],
           ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """TT-SVD of each row of ``rows`` (N, D): cores [(N, r_{t-1}, d_t, r_t)] and the squared error (N,)."""
    N, D = rows.shape
    check_tt_shape(D, dims, ranks)
    rest = rows.double().reshape(N, 1, D)  # (N, r_0 = 1, D)
    cores, discarded = [], torch.zeros(N, dtype=torch.float64, device=rows.device)
    for t, r in enumerate(ranks):
        r_prev = rest.shape[1]
        unfolding = rest.reshape(N, r_prev * dims[t], -1)  # (N, r_{t-1} d_t, d_{t+1} ⋯ d_k)
        U, sigma, Vh = torch.linalg.svd(unfolding, full_matrices=False)  # batched over tokens
        discarded += sigma[:, r:].pow(2).sum(-1)  # orthogonal truncation errors add up exactly
        cores.append(U[:, :, :r].reshape(N, r_prev, dims[t], r))  # G_t
        rest = sigma[:, :r, None] * Vh[:, :r, :]  # (N, r_t, d_{t+1} ⋯ d_k) = Σ_r V_rᵀ
    cores.append(rest.reshape(N, ranks[-1], dims[-1], 1))  # G_k
    return [c.to(rows.dtype) for c in cores], discarded


class TTEmbedding(nn.Module):
    """An embedding whose rows are tensor trains; ``forward(ids)`` contracts only the requested rows."""

    def __init__(self, num_embeddings: int, dims: tuple[int, ...], ranks: tuple[int, ...], scale: float = 1.0):
        super().__init__()
        check_tt_shape(math.prod(dims), dims, ranks)
        self.num_embeddings, self.embedding_dim = num_embeddings, math.prod(dims)
        self.dims, self.ranks = tuple(dims), tuple(ranks)
        self.scale = scale  # rows are multiplied by it on the way out (Gemma's sqrt(d_model)); not stored in G
        full = (1, *ranks, 1)
        self.cores = nn.ParameterList(nn.Parameter(torch.zeros(num_embeddings, full[t], d, full[t + 1]))
                                      for t, d in enumerate(dims))  # G_t: (V, r_{t-1}, d_t, r_t)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, dims: tuple[int, ...], ranks: tuple[int, ...],
                    scale: float = 1.0) -> TTEmbedding:
        """TT-SVD of every row of an embedding table ``weight`` (V, D); ``scale`` multiplies the rows looked up."""
        check_tt_shape(weight.shape[1], dims, ranks)
        module = cls(weight.shape[0], dims, ranks, scale).to(device=weight.device, dtype=weight.dtype)
        cores, _ = tt_svd(weight.detach(), dims, ranks)
        with torch.no_grad():
            for param, core in zip(module.cores, cores):
                param.copy_(core)
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.rows(ids)  # (..., D)
        return rows if self.scale == 1.0 else rows * torch.tensor(self.scale, dtype=rows.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The stored rows of ``ids`` (..., D), without ``scale``."""
        flat = ids.reshape(-1)  # (n,)
        out = self.cores[0][flat][:, 0]  # (n, d_1, r_1)
        for core in self.cores[1:]:
            g = core[flat]  # (n, r_{t-1}, d_t, r_t)
            out = torch.einsum("npr,nrdq->npdq", out, g).reshape(len(flat), -1, g.shape[-1])  # (n, d_1⋯d_t, r_t)
        return out.reshape(*ids.shape, self.embedding_dim)  # (..., D)

    def reconstruct(self) -> torch.Tensor:
        """The full (V, D) table as stored (without ``scale``) — for tests and error measurements only."""
        return self.rows(torch.arange(self.num_embeddings, device=self.cores[0].device))

    def spec(self) -> dict:
        return {"num": self.num_embeddings, "dims": list(self.dims), "ranks": list(self.ranks), "scale": self.scale}

    @classmethod
    def from_spec(cls, spec: dict) -> TTEmbedding:
        return cls(spec["num"], tuple(spec["dims"]), tuple(spec["ranks"]), spec.get("scale", 1.0))


def tt_parameter_count(num_embeddings: int, dims: tuple[int, ...], ranks: tuple[int, ...]) -> int:
    """V · Σ_t r_{t-1} d_t r_t."""
    full = (1, *ranks, 1)
    return num_embeddings * sum(full[t] * d * full[t + 1] for t, d in enumerate(dims))


@torch.no_grad()
def embedding_scale(embed: nn.Embedding) -> float:
    """The constant c with embed(i) = c · weight[i], measured on the largest row (Gemma's embeddings return
    sqrt(d_model) times the stored row); an embedding that is not such a scaled lookup is refused."""
    i = int(embed.weight.detach().float().norm(dim=1).argmax())
    row, out = embed.weight[i].float(), embed(torch.tensor([i], device=embed.weight.device))[0].float()
    c = float(out @ row / (row @ row).clamp(min=1e-30))
    if not torch.allclose(out, c * row, rtol=1e-2, atol=1e-6 * max(out.abs().max().item(), 1e-6)):
        raise ValueError(f"{type(embed).__name__} does not return a constant times the stored row; a tensor-train "
                         "table cannot stand in for it")
    return 1.0 if math.isclose(c, 1.0, rel_tol=1e-6) else c


def tt_compress_embedding(model: nn.Module, dims: tuple[int, ...], ranks: tuple[int, ...]) -> TTEmbedding:
    """Replace ``model``'s input embedding by a ``TTEmbedding`` (the output head keeps its dense weight)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.embed
    if not isinstance(embed, nn.Embedding):
        raise TypeError(f"the input embedding is a {type(embed).__name__}, not an nn.Embedding; compress it once")
    tt = TTEmbedding.from_weight(embed.weight, dims, ranks, embedding_scale(embed))
    if hasattr(model, "set_input_embeddings"):
        model.set_input_embeddings(tt)
    else:
        model.embed = tt
    return tt
