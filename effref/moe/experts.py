"""What every mixture-of-experts layer here shares: a bank of SwiGLU experts, the routing record, the layer.

A sparse MoE layer replaces a transformer block's MLP by E expert MLPs and a router that sends each token to a
few of them (Shazeer et al. 2017, arXiv:1701.06538, Eq. 1). Routers differ — this package has one module per
paper — but what happens after the routing decision does not:

    y_t = Σ_{(t, e, w) kept} w · FFN_e(x_t)          (a token no expert kept gets y_t = 0)

so a router returns a :class:`Routing`, the list of (token, expert, weight) assignments it kept, and
:func:`apply_experts` computes the sum, one expert at a time. The block adds y to its residual stream, so a
token dropped by every expert (over capacity) passes through the layer unchanged.

Implements: the expert bank  FFN_e(x) = W_down,e (silu(W_gate,e x) ⊙ W_up,e x)  (Shazeer 2020's SwiGLU, as in
Mixtral), capacity  C = ⌈capacity_factor · k · T / E⌉  (Switch Eq. 3 for k = 1; GShard's 2N/E for k = 2 and
factor 1), the first-come-first-served queue that decides which assignments fit (``fits_capacity``), and the
:class:`MoELayer` that joins a router and experts.
Glossary: T tokens in the batch (B·L, flattened) · E n_experts · D d_model · F d_ff of one expert · k experts
          per token · A kept assignments · C capacity (assignments one expert may take) · load = tokens per expert.
Left out: expert-parallel placement (expert_parallel.py), the grouped matmul of dropless MoE (dropless.py),
          padding to a fixed (E, C, D) dispatch tensor, which static-shape compilers need and eager PyTorch does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def check_experts(n_experts: int, top_k: int | None = None) -> None:
    """Refuse an expert count below 1, or a top-k outside 1..n_experts, naming the argument and the fix."""
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts={n_experts!r} must be an integer ≥ 1 (e.g. 8, as in Mixtral)")
    bad_k = isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_experts
    if top_k is not None and bad_k:
        raise ValueError(f"top_k={top_k!r} must be an integer from 1 to n_experts={n_experts}; a token cannot "
                         f"visit more experts than exist (use top_k ≤ {n_experts} or more experts)")


def check_capacity_factor(capacity_factor: float | None, allow_none: bool = True) -> None:
    """Refuse a capacity factor that is not a positive number (None = no capacity limit, where allowed)."""
    if capacity_factor is None and allow_none:
        return
    number = isinstance(capacity_factor, (int, float)) and not isinstance(capacity_factor, bool)
    if not number or not capacity_factor > 0:
        hint = " or None for no limit" if allow_none else ""
        raise ValueError(f"capacity_factor={capacity_factor!r} must be a positive number (1.0 = exactly the "
                         f"balanced share T·k/E per expert; 1.25 and 2.0 are the papers' choices){hint}")


def capacity(n_tokens: int, n_experts: int, capacity_factor: float, top_k: int = 1) -> int:
    """Assignments one expert may take: ⌈capacity_factor · top_k · n_tokens / n_experts⌉ (Switch Eq. 3)."""
    check_capacity_factor(capacity_factor, allow_none=False)
    return math.ceil(capacity_factor * top_k * n_tokens / n_experts)


def fits_capacity(expert: torch.Tensor, n_experts: int, limit: int, already: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which assignments fit, first come first served: assignment i (to ``expert[i]``, in the given order) is kept
    when fewer than ``limit`` earlier assignments (plus ``already[e]`` from a previous round) went to its expert.

    Returns (kept (A,) bool, the per-expert count after this round (E,), kept ones only).
    """
    one_hot = F.one_hot(expert, n_experts)  # (A, E)
    position = one_hot.cumsum(0).gather(1, expert[:, None])[:, 0] - 1  # (A,) 0 for the first to arrive
    if already is not None:
        position = position + already[expert]
    kept = position < limit  # (A,)
    count = (one_hot * kept[:, None]).sum(0)  # (E,)
    return kept, count if already is None else count + already


@dataclass
class Routing:
    """A router's decision for T tokens: the kept assignments (token, expert, weight), and what it saw.

    ``token[i]`` goes to ``expert[i]`` and that expert's output is scaled by ``weight[i]``; assignments the router
    wanted but dropped (over capacity, or not sampled) are simply absent. ``probs`` are the router's probabilities
    (T, E) that balancing losses and statistics read; ``aux_loss`` is the router's training loss, already scaled
    by its coefficient (a zero tensor when it has none).
    """

    token: torch.Tensor  # (A,) long, in 0..T-1
    expert: torch.Tensor  # (A,) long, in 0..E-1
    weight: torch.Tensor  # (A,) float
    probs: torch.Tensor  # (T, E) float
    aux_loss: torch.Tensor  # () float

    @property
    def n_tokens(self) -> int:
        return self.probs.shape[0]

    @property
    def n_experts(self) -> int:
        return self.probs.shape[1]

    def load(self) -> torch.Tensor:
        """Tokens each expert processes, (E,)."""
        return torch.bincount(self.expert, minlength=self.n_experts)

    def experts_per_token(self) -> torch.Tensor:
        """How many experts each token visits, (T,); 0 means it was dropped and only the residual carries it."""
        return torch.bincount(self.token, minlength=self.n_tokens)

    def dropped_fraction(self) -> float:
        """Share of tokens that no expert processes."""
        return (self.experts_per_token() == 0).float().mean().item()


class Experts(nn.Module):
    """E SwiGLU MLPs stored as three stacked weights, (E, F, D), (E, F, D) and (E, D, F); ``expert(e, x)``."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int):
        super().__init__()
        check_experts(n_experts)
        if d_model < 1 or d_ff < 1:
            raise ValueError(f"d_model={d_model}, d_ff={d_ff} must be positive integers")
        self.n_experts, self.d_model, self.d_ff = n_experts, d_model, d_ff
        self.gate = nn.Parameter(torch.randn(n_experts, d_ff, d_model) * 0.02)  # (E, F, D)
        self.up = nn.Parameter(torch.randn(n_experts, d_ff, d_model) * 0.02)  # (E, F, D)
        self.down = nn.Parameter(torch.randn(n_experts, d_model, d_ff) * 0.02)  # (E, D, F)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """FFN_e(x) = W_down,e (silu(W_gate,e x) ⊙ W_up,e x) for rows x (n, D) -> (n, D)."""
        return (F.silu(x @ self.gate[e].T) * (x @ self.up[e].T)) @ self.down[e].T  # (n, F) inside

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, d_model={self.d_model}, d_ff={self.d_ff}"


def apply_experts(x: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
    """y_t = Σ_{kept (t, e, w)} w · FFN_e(x_t) for x (T, D): each expert runs once, on the rows routed to it."""
    y = torch.zeros_like(x)  # (T, D): a token with no kept assignment stays 0
    for e in range(experts.n_experts):
        mine = routing.expert == e  # (A,)
        if not bool(mine.any()):
            continue
        tokens = routing.token[mine]  # (n_e,)
        out = experts.expert(e, x[tokens]) * routing.weight[mine, None].to(x.dtype)  # (n_e, D)
        y.index_add_(0, tokens, out)
    return y


class MoELayer(nn.Module):
    """A router and its experts in place of a block's MLP: (B, L, D) -> (B, L, D).

    The last call's routing is kept in ``self.routing`` (load statistics, the auxiliary loss). Routers that route
    by token identity (StableMoE's distilled router) read ``self.token_ids``, which the model sets before a call.
    """

    def __init__(self, router: nn.Module, experts: Experts):
        super().__init__()
        if getattr(router, "n_experts", experts.n_experts) != experts.n_experts:
            raise ValueError(f"router.n_experts={router.n_experts} but experts.n_experts={experts.n_experts}; "
                             "build both with the same number of experts")
        self.router, self.experts = router, experts
        self.routing: Routing | None = None
        self.token_ids: torch.Tensor | None = None  # (B, L), set by the model for id-reading routers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        flat = x.reshape(B * L, D)  # (T, D)
        ids = None if self.token_ids is None else self.token_ids.reshape(-1)  # (T,)
        self.routing = self.router(flat, ids)
        return apply_experts(flat, self.routing, self.experts).view(B, L, D)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE layer of ``model``, in order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def aux_loss(model: nn.Module) -> torch.Tensor:
    """The sum of every MoE layer's auxiliary loss from the last forward call (0 if none has run)."""
    losses = [layer.routing.aux_loss for layer in moe_layers(model) if layer.routing is not None]
    return torch.stack(losses).sum() if losses else torch.zeros(())
