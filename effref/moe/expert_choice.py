"""Expert Choice routing: experts pick their top tokens, so every expert does exactly the same amount of work.

Paper: Zhou, Lei, Liu, Du, Huang, Zhao, Dai, Chen, Le, Laudon (2022), "Mixture-of-Experts with Expert Choice
Routing", NeurIPS 2022, arXiv:2202.09368 — §3.2 (Eqs. 1–2).
Implements: token-to-expert scores S = softmax(X · W_g) over experts (n × e), then each expert takes the k tokens
it scores highest, G, I = TopK(Sᵀ, k) with bucket size k = n · c / e (c the capacity factor, the average number
of experts per token), and the output  Σ_i G[i, j] · FFN_i(x_{I[i, j]})  summed per token (Eq. 1's gather,
expert and scatter with the permutation P = one-hot(I)). A token may be chosen by several experts or by none.
Glossary: n T tokens · e E experts · c ``capacity_factor`` · k tokens per expert · G gating weights (e × k)
          · I token indices (e × k).
Left out: the entropy-regularised linear program that caps the experts per token (§3.3; the paper's default
          runs without it). Expert choice reads all n tokens of the batch at once, so in a causal language model a
          token's routing depends on later tokens; the paper trains decoder models this way and so do we, but
          the quick chapter says what that means for evaluation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from effref.moe.experts import Routing, check_capacity_factor, check_experts


class ExpertChoiceRouter(nn.Module):
    """Each expert takes its k = ⌈c · T / E⌉ best tokens (at most T); no auxiliary loss is needed."""

    def __init__(self, d_model: int, n_experts: int, capacity_factor: float = 1.0):
        super().__init__()
        check_experts(n_experts)
        check_capacity_factor(capacity_factor, allow_none=False)
        self.n_experts, self.capacity_factor = n_experts, capacity_factor
        self.gate = nn.Linear(d_model, n_experts, bias=False)  # W_g

    def bucket_size(self, n_tokens: int) -> int:
        """k = n · c / e, rounded up, at most n (an expert cannot take a token twice)."""
        return min(n_tokens, math.ceil(self.capacity_factor * n_tokens / self.n_experts))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        T, E = x.shape[0], self.n_experts
        probs = self.gate(x).float().softmax(-1)  # (T, E) S, a softmax over experts per token
        k = self.bucket_size(T)
        G, I = probs.T.topk(k, dim=-1)  # (E, k) each: expert i's gates and token indices
        expert = torch.arange(E, device=x.device).repeat_interleave(k)  # (E·k,)
        return Routing(token=I.reshape(-1), expert=expert, weight=G.reshape(-1), probs=probs,
                       aux_loss=torch.zeros((), device=x.device))
