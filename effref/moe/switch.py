"""Switch Transformer routing: one expert per token, a capacity, and the load-balancing loss.

Paper: Fedus, Zoph, Shazeer (2022), "Switch Transformers: Scaling to Trillion Parameter Models with Simple and
Efficient Sparsity", JMLR 23(120), arXiv:2101.03961 — §2.1 (Eqs. 1–2), §2.2 (Eqs. 3–6).
Implements: router probabilities p(x) = softmax(W_r x) (Eq. 1), top-1 routing y = p_i(x) E_i(x) with
i = argmax p(x) (Eq. 2), expert capacity C = (T / N) · capacity_factor (Eq. 3; tokens over it are dropped and
carried by the residual), and the auxiliary loss  α · N · Σ_i f_i · P_i  with f_i the fraction of tokens
dispatched to expert i and P_i the mean router probability for expert i (Eqs. 4–6). ``load_balancing_loss``
also takes top-k choices (f_i then counts a token once for each of its k experts, summing to k), the form
Mixtral and transformers use.
Glossary: N = E n_experts · T tokens · f_i ``fraction`` · P_i ``mean_prob`` · α ``aux_coef`` (paper: 1e-2).
Left out: the router z-loss (ST-MoE), multiplicative input jitter, selective precision (we compute the router
          in float32 always), expert dropout during fine-tuning.
"""

from __future__ import annotations

import torch
from torch import nn

from effref.moe.experts import Routing, capacity, check_capacity_factor, check_experts, fits_capacity


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """N · Σ_i f_i · P_i (Switch Eq. 4, without α) for router probabilities (T, N) and chosen experts (T, k).

    f_i = (1/T) Σ_t 1{i among token t's choices} (Eq. 5) carries no gradient; P_i = (1/T) Σ_t p_i(x_t) (Eq. 6)
    does. Perfectly uniform routing (f_i = k/N, P_i = 1/N) gives k, the minimum for uniform P.
    """
    if probs.ndim != 2 or expert_index.ndim != 2 or expert_index.shape[0] != probs.shape[0]:
        raise ValueError(f"probs must be (T, N) and expert_index (T, k) for the same T, got "
                         f"{tuple(probs.shape)} and {tuple(expert_index.shape)}")
    T, N = probs.shape
    fraction = torch.bincount(expert_index.reshape(-1), minlength=N).to(probs.dtype) / T  # (N,) Eq. 5
    mean_prob = probs.mean(0)  # (N,) Eq. 6
    return N * (fraction * mean_prob).sum()  # Eq. 4 / α


class SwitchRouter(nn.Module):
    """Top-1 routing with an optional capacity; the routing's ``aux_loss`` is α · N · Σ f_i P_i."""

    def __init__(self, d_model: int, n_experts: int, capacity_factor: float | None = 1.25,
                 aux_coef: float = 1e-2):
        super().__init__()
        check_experts(n_experts)
        check_capacity_factor(capacity_factor)
        if aux_coef < 0:
            raise ValueError(f"aux_coef={aux_coef} must be ≥ 0 (0 turns the balancing loss off; the paper: 1e-2)")
        self.n_experts, self.capacity_factor, self.aux_coef = n_experts, capacity_factor, aux_coef
        self.gate = nn.Linear(d_model, n_experts, bias=False)  # W_r

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        T = x.shape[0]
        probs = self.gate(x).float().softmax(-1)  # (T, N) Eq. 1
        weight, expert = probs.max(-1)  # (T,) each: Eq. 2, the gate value p_i(x) of the top-1 expert
        token = torch.arange(T, device=x.device)  # (T,)
        if self.capacity_factor is not None:  # Eq. 3: the first C tokens (in batch order) per expert
            kept, _ = fits_capacity(expert, self.n_experts, capacity(T, self.n_experts, self.capacity_factor))
            token, expert, weight = token[kept], expert[kept], weight[kept]
        first_choice = probs.argmax(-1, keepdim=True)  # (T, 1), dropped tokens included (f_i counts routing)
        aux = self.aux_coef * load_balancing_loss(probs, first_choice)
        return Routing(token, expert, weight, probs, aux)
