"""Tensor parallelism: one transformer layer's matrices split across the ranks of a process group.

Paper: Shoeybi, Patwary, Puri, LeGresley, Casper, Catanzaro (2019), "Megatron-LM", arXiv:1909.08053,
§3 and Fig. 3.
Implements: with t ranks, a linear Y = X Wᵀ + b is split two ways.
    column-parallel: W = [W_1; …; W_t] by output rows, rank i computes Y_i = X W_iᵀ + b_i (a slice of Y);
    row-parallel:    W = [W_1, …, W_t] by input columns, rank i holds X_i and computes X_i W_iᵀ, and
                     Y = Σ_i X_i W_iᵀ + b needs one all-reduce.
The MLP is column-parallel then row-parallel, Z = g(GeLU(f(X) A_i) B_i): the GeLU acts on each slice alone, so
the whole MLP costs one all-reduce forward and one backward. Attention is split the same way by heads: each
rank owns n_heads / t heads (their rows of W_q, W_k, W_v, column-parallel) and the matching columns of W_o
(row-parallel). The two conjugate operators (Fig. 3 of the paper) place the communication:
    f: forward identity,   backward all-reduce of ∂L/∂X   (X enters every rank's slice)
    g: forward all-reduce, backward identity              (the partial sums become Y)
so a layer (attention + MLP) all-reduces a (B, T, D) tensor twice forward and twice backward.
Glossary: t tensor-parallel size = world size of ``group`` · W_i, b_i a rank's shard · f ``copy_to_ranks``
          · g ``sum_over_ranks`` · A, B the MLP's two weights (``up``, ``down``).
Left out: sequence parallelism, vocabulary-parallel embeddings and cross-entropy, fused kernels and the
overlap of communication with compute. Simplification: the bias of a row-parallel linear and everything
outside the split matrices (norms, residuals) is replicated and computed by every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

traffic = {"all_reduce_calls": 0, "all_reduce_bytes": 0}  # this process's tensor-parallel communication


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()
    traffic["all_reduce_calls"] += 1
    traffic["all_reduce_bytes"] += x.numel() * x.element_size()
    dist.all_reduce(x, group=group)
    return x


class _CopyToRanks(torch.autograd.Function):
    """f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _SumOverRanks(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    """Megatron's f: pass ``x`` on unchanged; sum its gradient over the ranks of ``group``."""
    return _CopyToRanks.apply(x, group)


def sum_over_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    """Megatron's g: sum ``x`` over the ranks of ``group``; pass the gradient on unchanged."""
    return _SumOverRanks.apply(x, group)


def _rank_and_size(group) -> tuple[int, int]:
    if not dist.is_initialized():
        raise RuntimeError("tensor parallelism needs a process group: call "
                           "effref.distributed.init_distributed() or start the ranks with run_ranks")
    return dist.get_rank(group), dist.get_world_size(group)


def _split_or_raise(size: int, name: str, world: int) -> int:
    if size % world:
        raise ValueError(f"{name}={size} is not divisible by the tensor-parallel world size {world}; "
                         f"use a world size that divides {size}")
    return size // world


class ColumnParallelLinear(nn.Module):
    """Rank i's rows W_i (out_features / t of them) of a linear; returns its slice Y_i of the output."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group=None):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(weight.detach().clone())  # (out / t, in)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())  # (out / t,)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None) -> ColumnParallelLinear:
        """This rank's shard of a full ``nn.Linear`` (every rank passes the same one)."""
        rank, world = _rank_and_size(group)
        rows = _split_or_raise(linear.out_features, "out_features", world)
        keep = slice(rank * rows, (rank + 1) * rows)
        return cls(linear.weight[keep], None if linear.bias is None else linear.bias[keep], group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out / t)
        return F.linear(copy_to_ranks(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Rank i's columns W_i (in_features / t of them); takes its input slice X_i, returns the full Y."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group=None):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(weight.detach().clone())  # (out, in / t)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())  # (out,), replicated

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None) -> RowParallelLinear:
        rank, world = _rank_and_size(group)
        cols = _split_or_raise(linear.in_features, "in_features", world)
        return cls(linear.weight[:, rank * cols:(rank + 1) * cols], linear.bias, group)

    def forward(self, x_slice: torch.Tensor) -> torch.Tensor:  # (..., in / t) -> (..., out)
        y = sum_over_ranks(F.linear(x_slice, self.weight), self.group)  # Σ_i X_i W_iᵀ
        return y if self.bias is None else y + self.bias  # bias added once, after the sum


class ParallelMLP(nn.Module):
    """The GeLU MLP split Megatron's way: ``up`` column-, ``down`` row-parallel; one all-reduce each way."""

    def __init__(self, up: nn.Linear, down: nn.Linear, group=None):
        super().__init__()
        self.up = ColumnParallelLinear.from_linear(up, group)
        self.down = RowParallelLinear.from_linear(down, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        return self.down(F.gelu(self.up(x)))  # (..., 4D / t) in between


class ParallelSelfAttention(nn.Module):
    """Causal multi-head self-attention with the heads split over the ranks of ``group``.

    Built from a ``torch.nn.MultiheadAttention`` (batch_first, packed q/k/v projection): rank i keeps heads
    [i·h, (i+1)·h) with h = n_heads / t — their rows of W_q, W_k and W_v and their columns of W_o.
    """

    def __init__(self, mha: nn.MultiheadAttention, group=None):
        super().__init__()
        if not isinstance(mha, nn.MultiheadAttention) or not mha.batch_first or not mha._qkv_same_embed_dim:
            raise TypeError("mha must be an nn.MultiheadAttention(embed_dim, num_heads, batch_first=True) "
                            "with one packed q/k/v projection")
        rank, world = _rank_and_size(group)
        self.local_heads = _split_or_raise(mha.num_heads, "num_heads", world)
        self.head_dim = mha.head_dim
        width, d = self.local_heads * self.head_dim, mha.embed_dim
        rows = torch.cat([torch.arange(part * d + rank * width, part * d + (rank + 1) * width)
                          for part in range(3)])  # this rank's rows of q, then of k, then of v
        bias = mha.in_proj_bias
        self.qkv = ColumnParallelLinear(mha.in_proj_weight[rows], None if bias is None else bias[rows], group)
        self.out = RowParallelLinear.from_linear(mha.out_proj, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        batch, steps, _ = x.shape
        qkv = self.qkv(x).view(batch, steps, 3, self.local_heads, self.head_dim)  # (B, T, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, h, T, d)
        heads = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, h, T, d)
        return self.out(heads.transpose(1, 2).reshape(batch, steps, -1))  # (B, T, h·d) -> (B, T, D)


class DenseBlock(nn.Module):
    """The single-process pre-LN block that ``ParallelBlock`` splits: x + Attn(LN(x)), then x + MLP(LN(x)).

    Attention is torch's own ``nn.MultiheadAttention`` (causal), so the split version is checked against it.
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.up, self.down = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        h = self.norm1(x)
        steps = x.shape[1]
        causal = torch.ones(steps, steps, dtype=torch.bool, device=x.device).triu(1)  # True = masked
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class ParallelBlock(nn.Module):
    """This rank's part of a ``DenseBlock``: attention split by heads, MLP by hidden units, norms copied."""

    def __init__(self, block: DenseBlock, group=None):
        super().__init__()
        self.norm1, self.norm2 = _replica(block.norm1), _replica(block.norm2)
        self.attn = ParallelSelfAttention(block.attn, group)
        self.mlp = ParallelMLP(block.up, block.down, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _replica(norm: nn.LayerNorm) -> nn.LayerNorm:
    copy = nn.LayerNorm(norm.normalized_shape, eps=norm.eps)
    copy.load_state_dict(norm.state_dict())
    return copy
