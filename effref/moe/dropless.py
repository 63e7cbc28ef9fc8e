"""Dropless MoE, MegaBlocks' idea in plain PyTorch: group tokens by expert and run one matmul per group.

Paper: Gale, Narayanan, Young, Zaharia (2023), "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts",
MLSys 2023, arXiv:2211.15841 — §3 (the capacity factor's dilemma), §5 (dMoE: the MoE layer as block-sparse
matrix products).
Implements, for the same routing:
  ``padded_experts``   the fixed-shape formulation MegaBlocks replaces: scatter the tokens into an (E, C, D)
                       buffer, one batched matmul over all E · C slots (zero padding for an expert below its
                       capacity C, dropped tokens above it), gather back;
  ``dropless_experts`` permute the assignments so that each expert's tokens are contiguous (a stable sort by
                       expert), a grouped matmul — one GEMM per expert over exactly its n_e rows — and un-permute
                       with a weighted scatter-add: A rows computed, nothing padded, nothing dropped;
  ``block_sparse_rows`` the rows MegaBlocks' block-sparse kernels compute: each group padded only up to a
                       multiple of the block size b (128 in the paper), Σ_e ⌈n_e / b⌉ · b.
Glossary: E experts · C capacity · D d_model · A kept assignments · n_e rows of expert e (its load) · b block.
Left out: the block-sparse GPU kernels (SDD, DSD, and the transposed-index metadata); they need CUDA. The grouped
          matmul here is a Python loop of ordinary matmuls, a reference for their output, not their speed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from effref.moe.experts import Experts, Routing, fits_capacity


def _check_routing(x: torch.Tensor, routing: Routing, experts: Experts) -> None:
    if x.ndim != 2 or x.shape[0] != routing.n_tokens or x.shape[1] != experts.d_model:
        raise ValueError(f"x must be (T, D) = ({routing.n_tokens}, {experts.d_model}) for this routing and these "
                         f"experts, got {tuple(x.shape)}; flatten (B, L, D) with x.reshape(-1, D)")


def dropless_experts(x: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
    """Σ_kept w · FFN_e(x_t) for x (T, D), computed as permute → grouped matmul → un-permute; (T, D)."""
    _check_routing(x, routing, experts)
    order = torch.sort(routing.expert, stable=True).indices  # (A,) the permutation that groups by expert
    token, weight = routing.token[order], routing.weight[order]  # (A,) each, grouped
    load = torch.bincount(routing.expert, minlength=experts.n_experts).tolist()  # n_e per expert
    rows = x[token]  # (A, D) gathered: expert 0's rows, then expert 1's, ...
    groups = rows.split(load)  # one block of rows per expert
    out = torch.cat([experts.expert(e, group) for e, group in enumerate(groups)])  # (A, D): one GEMM per group
    y = torch.zeros_like(x)  # (T, D)
    return y.index_add_(0, token, out * weight[:, None].to(x.dtype))  # un-permute and combine


def padded_experts(x: torch.Tensor, routing: Routing, experts: Experts, capacity: int) -> torch.Tensor:
    """The same sum through an (E, C, D) buffer: assignments past an expert's C-th (in order) are dropped; (T, D).

    Computes E · C rows whatever the load: the padding MegaBlocks' dropless layer avoids.
    """
    _check_routing(x, routing, experts)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity={capacity!r} must be an integer ≥ 1 (slots per expert); see experts.capacity")
    E, C = experts.n_experts, capacity
    kept, _ = fits_capacity(routing.expert, E, C)  # (A,)
    token, expert, weight = routing.token[kept], routing.expert[kept], routing.weight[kept]
    slot = F.one_hot(expert, E).cumsum(0).gather(1, expert[:, None])[:, 0] - 1  # (A',) position in the buffer
    buffer = x.new_zeros(E, C, x.shape[1])  # (E, C, D)
    buffer = buffer.index_put((expert, slot), x[token])  # dispatch
    hidden = F.silu(buffer @ experts.gate.transpose(1, 2)) * (buffer @ experts.up.transpose(1, 2))  # (E, C, F)
    out = hidden @ experts.down.transpose(1, 2)  # (E, C, D): one batched matmul, padding included
    y = torch.zeros_like(x)
    return y.index_add_(0, token, out[expert, slot] * weight[:, None].to(x.dtype))  # combine


def block_sparse_rows(load: torch.Tensor | list[int], block: int = 128) -> int:
    """Rows a block-sparse kernel computes for per-expert loads n_e: Σ_e ⌈n_e / block⌉ · block."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block={block!r} must be an integer ≥ 1 (MegaBlocks uses 128)")
    return sum(math.ceil(int(n) / block) * block for n in load)
