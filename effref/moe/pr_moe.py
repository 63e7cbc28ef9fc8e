"""DeepSpeed-MoE's PR-MoE: a dense MLP every token uses plus one routed expert, and more experts in later layers.

Paper: Rajbhandari, Li, Yao, Zhang, Aminabadi, Awan, Rasley, He (2022), "DeepSpeed-MoE: Advancing Mixture-of-Experts
Inference and Training to Power Next-Generation AI Scale", ICML 2022, arXiv:2201.05596 — §4.1 (Pyramid-MoE,
Residual-MoE, PR-MoE).
Implements: Residual-MoE  y = MLP(x) + g(x) · E_{e(x)}(x)  with a top-1 router (the expert corrects a fixed MLP,
which the paper finds as good as top-2 routing at top-1's communication), and Pyramid-MoE, a different number of
experts per layer (the paper puts more in the last layers, where it finds them more useful); ``pr_moe`` builds a
Mixtral-shaped model with both.
Glossary: MLP the dense SwiGLU every token uses (``dense``) · E_e the routed experts (``moe``) · g the router's
          gate value · experts_per_layer the pyramid.
Left out: the mixing coefficients DeepSpeed's code learns for the two branches, Mixture-of-Students (the distilled,
          shallower PR-MoE), and DeepSpeed's inference system (expert-slicing, fused kernels).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from effref.moe.experts import Experts, MoELayer, check_experts
from effref.moe.mixtral import Mixtral, MixtralConfig
from effref.moe.switch import SwitchRouter


class ResidualMoE(nn.Module):
    """MLP(x) + g · E_e(x) for (B, L, D): the dense branch is a one-expert bank, the routed one an MoE layer."""

    def __init__(self, d_model: int, d_ff: int, n_experts: int, aux_coef: float = 0.01):
        super().__init__()
        check_experts(n_experts)
        self.dense = Experts(1, d_model, d_ff)  # the MLP every token uses
        self.moe = MoELayer(SwitchRouter(d_model, n_experts, capacity_factor=None, aux_coef=aux_coef),
                            Experts(n_experts, d_model, d_ff))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        return self.dense.expert(0, x.reshape(B * L, D)).view(B, L, D) + self.moe(x)  # (B, L, D)


def pr_moe(cfg: MixtralConfig, experts_per_layer: Sequence[int], aux_coef: float = 0.01) -> Mixtral:
    """A Mixtral-shaped model whose layer i is a Residual-MoE with ``experts_per_layer[i]`` top-1 experts."""
    if len(experts_per_layer) != cfg.n_layers:
        raise ValueError(f"experts_per_layer has {len(experts_per_layer)} entries for n_layers={cfg.n_layers}; "
                         "give one expert count per layer, e.g. (2, 4) for a two-layer pyramid")
    for n in experts_per_layer:
        check_experts(n)
    model = Mixtral(cfg)
    for block, n in zip(model.blocks, experts_per_layer):
        block.mlp = ResidualMoE(cfg.d_model, cfg.d_ff, n, aux_coef)
    return model
