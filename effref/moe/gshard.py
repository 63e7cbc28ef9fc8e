"""GShard's top-2 gating: two experts per token, a capacity per expert, and a randomly kept second choice.

Paper: Lepikhin, Lee, Xu, Chen, Firat, Huang, Krikun, Shazeer, Chen (2021), "GShard: Scaling Giant Models with
Conditional Computation and Automatic Sharding", ICLR 2021, arXiv:2006.16668 — §2.2 and Algorithm 1.
Implements: gates g = softmax(W_g x); the best expert e1 and the second e2 with their gates normalised,
g1 / (g1 + g2) and g2 / (g1 + g2); expert capacity C (GShard's 2N/E is ``capacity_factor=1`` with k = 2); first
choices claim capacity in token order, then second choices, each only with probability min(1, 2·g2) ("random
routing": a small second gate is rarely worth an expert's slot); assignments over capacity are dropped, and a
token that loses both passes through the residual. The auxiliary loss  ℓ_aux = (1/E) Σ_e (c_e / S) · m_e  with
c_e the first choices of expert e and m_e its mean gate (Algorithm 1, line 13) is scaled by ``aux_coef``.
Glossary: S tokens in the group (here: the whole batch) · E experts · C capacity · g1, g2 gates · c_e, m_e as above.
Left out: local groups (the batch is one group), the XLA sharding annotations that are GShard's other half;
          a non-sampled second choice takes no slot (as in the Mesh TensorFlow code), where Algorithm 1 as printed
          increments c_e2 either way; at evaluation every second choice is wanted (deterministic outputs).
"""

from __future__ import annotations

import torch
from torch import nn

from effref.moe.experts import Routing, capacity, check_capacity_factor, check_experts, fits_capacity


class GShardRouter(nn.Module):
    """Top-2 routing with capacity and random routing of the second expert (seed it with ``generator``)."""

    def __init__(self, d_model: int, n_experts: int, capacity_factor: float = 1.0, aux_coef: float = 1e-2,
                 random_second: bool = True, generator: torch.Generator | None = None):
        super().__init__()
        check_experts(n_experts, 2)
        check_capacity_factor(capacity_factor, allow_none=False)
        self.n_experts, self.capacity_factor, self.aux_coef = n_experts, capacity_factor, aux_coef
        self.top_k = 2
        self.random_second, self.generator = random_second, generator
        self.gate = nn.Linear(d_model, n_experts, bias=False)  # w_g

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        S, E = x.shape[0], self.n_experts
        probs = self.gate(x).float().softmax(-1)  # (S, E) g_{s,e}
        top = probs.topk(2, dim=-1)
        (g1, g2), (e1, e2) = top.values.unbind(-1), top.indices.unbind(-1)  # (S,) each
        g1, g2 = g1 / (g1 + g2), g2 / (g1 + g2)  # (S,) each: normalised gates
        C = capacity(S, E, self.capacity_factor, top_k=2)
        kept1, count = fits_capacity(e1, E, C)  # (S,), (E,): first choices claim slots in token order
        wanted2 = torch.ones_like(kept1)
        if self.random_second and self.training:  # dispatch e2 with probability min(1, 2·g2); always at eval
            rnd = torch.rand(S, generator=self.generator).to(x.device)  # (S,)
            wanted2 = 2 * g2 > rnd
        kept2, _ = fits_capacity(e2[wanted2], E, C, already=count)  # second choices take what is left
        token = torch.arange(S, device=x.device)
        token2 = token[wanted2][kept2]
        m = probs.mean(0)  # (E,) mean gates
        c = torch.bincount(e1, minlength=E).float()  # (E,) first choices
        aux = self.aux_coef * (c / S * m).mean()  # Algorithm 1, line 13
        return Routing(token=torch.cat([token[kept1], token2]), expert=torch.cat([e1[kept1], e2[token2]]),
                       weight=torch.cat([g1[kept1], g2[token2]]), probs=probs, aux_loss=aux)
