"""FSDP: fully sharded data parallelism, unit by unit, with the next unit's parameters fetched ahead of use.

Paper: Zhao, Gu, Varma, Luo, Huang, Xu, Wright, Shojanazeri, Ott, Shleifer, Desmaison, Balioglu, Damania,
Nguyen, Chauhan, Hao, Mathews, Li (2023), "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel",
VLDB, arXiv:2304.11277 — §3 (FSDP units, full sharding, backward and forward prefetching).
Implements: ZeRO stage 3 (effref.distributed.zero) where the user names the units (a transformer's blocks) and
the all-gather of a unit's parameters overlaps the computation of the unit before it: when unit i's forward
starts, the gather of unit i+1 is issued without waiting; when unit i's backward starts, so is the gather of the
unit that runs next in backward (the reverse of the order in which forwards ended). The orders are recorded on
the first step, as FSDP does. At most two units are whole at once (plus the root's own parameters), so the
per-rank parameter peak is Ψ/N_d + 2·max_u Ψ_u instead of Ψ/N_d + max_u Ψ_u — prefetch trades one unit of
memory for hiding the gather's latency.
Glossary: FSDP unit ``units`` · sharding factor F = N_d (full sharding) · prefetch ``prefetch``.
Left out: hybrid sharding (F < N_d), the flat-parameter/DTensor bookkeeping of torch's FSDP1/FSDP2,
rate limiting of prefetches, mixed-precision parameters, and ``reshard_after_forward=False``. On gloo the
overlap is real (the collective runs on its own thread) but the tiny models of the tests are too quick to show
a speed-up; the chapter measures the memory, not the time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from effref.distributed.zero import Unit, ZeroEngine


class FSDPEngine(ZeroEngine):
    """ZeRO stage 3 over the given ``units`` with forward and backward prefetch (``prefetch=False``: on demand)."""

    def __init__(self, model: nn.Module, optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
                 units: Iterable[nn.Module], prefetch: bool = True,
                 optimizer_device: torch.device | str | None = None) -> None:
        units = list(units)
        if not units:
            raise ValueError("units is empty: FSDP shards module by module; pass e.g. units=list(model.blocks)")
        super().__init__(model, 3, optimizer, units, optimizer_device)
        self.prefetch = prefetch
        self.forward_start_order: list[Unit] = []  # recorded on the first forward
        self.forward_end_order: list[Unit] = []  # its reverse is the backward order
        self.prefetches = 0  # all-gathers issued ahead of use

    def _prefetch(self, order: list[Unit], unit: Unit, ahead: int) -> None:
        i = order.index(unit) + ahead
        if self.prefetch and 0 <= i < len(order) and not order[i].gathered():
            self._gather(order[i], async_op=True)  # issued now, waited for when that unit starts
            self.prefetches += 1

    def _before_forward(self, unit: Unit) -> None:
        if unit not in self.forward_start_order:
            self.forward_start_order.append(unit)
        self._gather(unit)
        self._prefetch(self.forward_start_order, unit, +1)

    def _after_forward(self, unit: Unit, output) -> None:
        if unit not in self.forward_end_order:
            self.forward_end_order.append(unit)
        super()._after_forward(unit, output)

    def _before_backward(self, unit: Unit) -> None:
        self._gather(unit)
        self._prefetch(self.forward_end_order, unit, -1)  # backward runs the forwards' ends in reverse
