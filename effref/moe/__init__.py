"""Mixture of experts (survey §2.5.2): routers, Mixtral, PR-MoE, dropless, expert-parallel, offloaded experts."""

from effref.moe.base_layers import BaseRouter, balanced_assignment, linear_assignment
from effref.moe.dropless import block_sparse_rows, dropless_experts, padded_experts
from effref.moe.expert_choice import ExpertChoiceRouter
from effref.moe.expert_parallel import ExpertParallelMoE
from effref.moe.experts import (
    Experts,
    MoELayer,
    Routing,
    apply_experts,
    aux_loss,
    capacity,
    fits_capacity,
    moe_layers,
)
from effref.moe.gshard import GShardRouter
from effref.moe.mixtral import Mixtral, MixtralConfig, TopKRouter, load_mixtral, save_mixtral, set_routers
from effref.moe.offload import OffloadedExperts, lru_misses, offload_experts
from effref.moe.pr_moe import ResidualMoE, pr_moe
from effref.moe.stablemoe import StableMoERouter, stablemoe_stage2
from effref.moe.switch import SwitchRouter, load_balancing_loss

__all__ = [
    "BaseRouter", "ExpertChoiceRouter", "ExpertParallelMoE", "Experts", "GShardRouter", "Mixtral", "MixtralConfig",
    "MoELayer", "OffloadedExperts", "ResidualMoE", "Routing", "StableMoERouter", "SwitchRouter", "TopKRouter",
    "apply_experts", "aux_loss", "balanced_assignment", "block_sparse_rows", "capacity", "dropless_experts",
    "fits_capacity", "linear_assignment", "load_balancing_loss", "load_mixtral", "lru_misses", "moe_layers",
    "offload_experts", "padded_experts", "pr_moe", "save_mixtral", "set_routers", "stablemoe_stage2",
]
