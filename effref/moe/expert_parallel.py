"""Expert parallelism: each process holds E/P of the experts, and tokens travel to them by all-to-all.

Paper: Lepikhin et al. (2021), "GShard", arXiv:2006.16668 — §2.2–3 (experts sharded over devices, dispatch and
combine as all-to-all); Fedus et al. (2022), "Switch Transformers", arXiv:2101.03961 — §5 (expert parallelism);
Rajbhandari et al. (2022), "DeepSpeed-MoE", arXiv:2201.05596 — §5 (the same, with data parallelism elsewhere).
Implements: on each of P processes (a torch.distributed group), with its own batch of tokens: route locally with
the replicated router; sort the kept assignments by expert, which sorts them by owner p = e // (E/P); exchange
the per-owner counts (all_to_all); send the token rows and their expert ids (``all_to_all_single``, the autograd
version for rows, so gradients flow back the same way); run the local experts on what arrived; send results
back; combine with the gate weights. Outputs and gradients equal those of the single-process layer on the
concatenated batch for any router whose decision is per token (top-k; not capacity or expert choice, whose
decisions depend on the whole batch and are then taken per process).
Glossary: P world size · E experts · E/P local experts · rank p owns experts p·E/P … (p+1)·E/P − 1.
Left out: overlapping communication with computation, hierarchical (intra/inter-node) all-to-all, capacity-padded
          fixed-size messages; the replicated parameters' gradients are all-reduced by the caller
          (``sync_replicated_grads``), as data parallelism would.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from effref.moe.experts import Experts, MoELayer, Routing


class ExpertParallelMoE(nn.Module):
    """This process's share of an MoE layer: the router (a copy) and experts [rank · E/P, (rank + 1) · E/P)."""

    def __init__(self, layer: MoELayer, group: dist.ProcessGroup | None = None):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call dist.init_process_group('gloo' or "
                               "'nccl', ...) in every process first")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        E = layer.experts.n_experts
        if E % world:
            raise ValueError(f"n_experts={E} cannot be split over {world} processes; use a world size that "
                             f"divides {E}")
        self.group, self.world, self.n_local = group, world, E // world
        self.first = rank * self.n_local
        self.router = layer.router
        self.experts = Experts(self.n_local, layer.experts.d_model, layer.experts.d_ff)
        with torch.no_grad():
            for name in ("gate", "up", "down"):
                mine = getattr(layer.experts, name)[self.first:self.first + self.n_local]
                getattr(self.experts, name).copy_(mine)
        self.routing: Routing | None = None
        self.token_ids: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        flat = x.reshape(B * L, D)  # (T, D) this process's tokens
        ids = None if self.token_ids is None else self.token_ids.reshape(-1)
        self.routing = routing = self.router(flat, ids)
        order = torch.sort(routing.expert, stable=True).indices  # (A,) grouped by expert, hence by owner
        token, expert, weight = routing.token[order], routing.expert[order], routing.weight[order]
        send = torch.bincount(expert // self.n_local, minlength=self.world)  # (P,) rows for each owner
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # (P,) rows each process sends us
        send_sizes, recv_sizes = send.tolist(), recv.tolist()
        rows = dist_nn.all_to_all_single(flat.new_empty(sum(recv_sizes), D), flat[token], recv_sizes, send_sizes,
                                         group=self.group)  # (R, D) rows for our experts, autograd-aware
        their_expert = expert.new_empty(sum(recv_sizes))
        dist.all_to_all_single(their_expert, expert, recv_sizes, send_sizes, group=self.group)  # (R,)
        out = torch.zeros_like(rows)  # (R, D)
        for e in range(self.n_local):
            mine = torch.nonzero(their_expert == self.first + e)[:, 0]
            if len(mine):
                out = out.index_copy(0, mine, self.experts.expert(e, rows[mine]))
        back = dist_nn.all_to_all_single(flat.new_empty(len(token), D), out, send_sizes, recv_sizes,
                                         group=self.group)  # (A, D) our tokens' results, in our order
        y = torch.zeros_like(flat)
        return y.index_add_(0, token, back * weight[:, None].to(flat.dtype)).view(B, L, D)

    def sync_replicated_grads(self) -> None:
        """Sum the router's gradients over the processes (the experts' are local and stay as they are)."""
        for p in self.router.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.group)
