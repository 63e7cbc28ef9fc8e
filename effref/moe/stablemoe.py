"""StableMoE: learn a balanced routing, distil it into a lightweight router, then freeze that router.

Paper: Dai, Dong, Ma, Zheng, Sui, Chang, Wei (2022), "StableMoE: Stable Routing Strategy for Mixture of
Experts", ACL 2022, arXiv:2204.08396 — §3.1 (stage 1), §3.2 (stage 2).
Implements: expert centroids E_i and token–expert scores s_{t,i} = E_iᵀ h_t; greedy assignment a_t = argmax_i
s_{t,i}; the output  h_t + σ(s_{t,a_t}) · FFN_{a_t}(h_t)  (the residual is the block's). Stage 1 trains with
  a balance loss   L_bal = Σ_i ((|A_i| − n̄) / n̄) · (1/T) Σ_{t ∈ A_i} σ(s_{t,i})  (n̄ = T/E, the balanced load:
                   an overloaded expert's scores are pushed down, an underloaded one's up), and
  a distillation loss  L_dis = CE(D(x_t) · Êᵀ, a_t)  that teaches a lightweight router — a 50-dimensional word
                   embedding D of the token id with its own centroids Ê — the backbone's assignment.
Stage 2 (``freeze_routing``): the distilled router, frozen, assigns every token (so a token id always goes to
the same expert); σ(s_{t,a_t}) still gates the output and keeps training; no routing losses.
Glossary: h_t token representation · E_i ``centroids`` (E × D) · s scores · A_i tokens assigned to expert i
          · n̄ balanced load · D ``distilled_embed`` (vocab × 50) · Ê ``distilled_centroids`` (E × 50).
Left out: the CNN and transformer variants of the distilled router (the paper's default is the word embedding),
          the all-to-all of the multi-worker version. The balance loss is normalised per token and expert as in
          the authors' code ((|A_i| − n̄)/n̄) and scaled by ``balance_coef`` (our choice, not the paper's value).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effref.moe.experts import Routing, check_experts, moe_layers


class StableMoERouter(nn.Module):
    """Stage 1: route by the backbone and distil; stage 2 (after ``freeze_routing``): route by the frozen token-id
    router. Needs the token ids (``MoELayer.token_ids``, which our Mixtral sets on every call)."""

    def __init__(self, d_model: int, n_experts: int, vocab_size: int, distill_dim: int = 50,
                 balance_coef: float = 0.3, distill_coef: float = 1.0):
        super().__init__()
        check_experts(n_experts)
        if vocab_size < 1 or distill_dim < 1 or balance_coef < 0 or distill_coef < 0:
            raise ValueError(f"vocab_size={vocab_size}, distill_dim={distill_dim} must be ≥ 1 and balance_coef="
                             f"{balance_coef}, distill_coef={distill_coef} ≥ 0")
        self.n_experts, self.balance_coef, self.distill_coef = n_experts, balance_coef, distill_coef
        self.centroids = nn.Parameter(nn.init.orthogonal_(torch.empty(n_experts, d_model), gain=0.1))  # E_i
        self.distilled_embed = nn.Embedding(vocab_size, distill_dim)  # D: the lightweight router's features
        distilled = nn.init.orthogonal_(torch.empty(n_experts, distill_dim), gain=0.1)
        self.distilled_centroids = nn.Parameter(distilled)  # Ê
        self.stage = 1

    def freeze_routing(self) -> None:
        """Enter stage 2: the distilled router decides every assignment from now on and stops learning."""
        self.stage = 2
        self.distilled_embed.requires_grad_(False)
        self.distilled_centroids.requires_grad_(False)

    def distilled_scores(self, token_ids: torch.Tensor) -> torch.Tensor:
        """D(x_t) · Êᵀ, (T, E): the lightweight router's scores, from the token ids alone."""
        return self.distilled_embed(token_ids).float() @ self.distilled_centroids.float().T

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        if token_ids is None:
            raise ValueError("StableMoERouter routes by token id as well: call it with token_ids (T,), or use it "
                             "inside effref.moe.mixtral.Mixtral, which passes them to every layer")
        T, E = x.shape[0], self.n_experts
        scores = x.float() @ self.centroids.float().T  # (T, E) s_{t,i}
        token = torch.arange(T, device=x.device)
        if self.stage == 1:
            expert = scores.argmax(-1)  # (T,) greedy assignment by the backbone
        else:
            expert = self.distilled_scores(token_ids).argmax(-1)  # (T,) by the frozen distilled router
        gate = torch.sigmoid(scores)  # (T, E)
        aux = torch.zeros((), device=x.device)
        if self.stage == 1 and self.training:
            load = torch.bincount(expert, minlength=E).float()  # (E,) |A_i|
            balanced = T / E  # n̄
            assigned_gate = torch.zeros(E, device=x.device).index_add(0, expert, gate[token, expert])  # Σ σ(s)
            balance = ((load - balanced) / balanced * assigned_gate / T).sum()  # L_bal
            distill = F.cross_entropy(self.distilled_scores(token_ids), expert)  # L_dis (the target has no grad)
            aux = self.balance_coef * balance + self.distill_coef * distill
        return Routing(token, expert, gate[token, expert], probs=scores.softmax(-1), aux_loss=aux)


def stablemoe_stage2(model: nn.Module) -> int:
    """Freeze the routing of every StableMoE layer of ``model`` (stage 2); returns how many were frozen."""
    routers = [layer.router for layer in moe_layers(model) if isinstance(layer.router, StableMoERouter)]
    if not routers:
        raise ValueError("model has no StableMoERouter; install them first, e.g. set_routers(model, lambda i: "
                         "StableMoERouter(d_model, n_experts, vocab_size))")
    for router in routers:
        router.freeze_routing()
    return len(routers)
