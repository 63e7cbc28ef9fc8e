"""ZeRO: the model states of data parallelism partitioned across the ranks, stage by stage.

Paper: Rajbhandari, Rasley, Ruwase, He (2020), "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models", SC20, arXiv:1910.02054 — §5.1–5.3 (P_os, P_g, P_p), Figure 1, §7 (communication).
Implements: N_d ranks train one model on different slices of each batch. Per rank, for Ψ parameters, the paper
counts (mixed precision: fp16 parameters and gradients, K = 12 bytes of fp32 master copy, momentum and variance)
    stage 0, plain data parallelism     (2 + 2 + K)·Ψ
    stage 1, optimizer states P_os      2Ψ + 2Ψ + K·Ψ/N_d
    stage 2, + gradients P_os+g         2Ψ + (2 + K)·Ψ/N_d
    stage 3, + parameters P_os+g+p      (2 + 2 + K)·Ψ/N_d
Here everything is fp32, so the same four lines hold with 4 bytes of parameter, 4 of gradient and K = 8 (Adam's m
and v; an fp32 model needs no master copy): 16Ψ, 8Ψ + 8Ψ/N_d, 4Ψ + 12Ψ/N_d, 16Ψ/N_d (``model_state_bytes``).
Collectives (where the paper puts them): stage 0 all-reduces the gradients; stages 1 and 2 reduce-scatter them
(each rank needs only the average of its own shard) and all-gather the updated parameters after the step; stage
3 all-gathers a unit's parameters right before its forward and again before its backward, and frees them after
each, then reduce-scatters the unit's gradients — 1.5× the traffic of stages 0–2 (§7.2).
Layout: each unit (a module: a transformer block, say; the model itself takes the parameters no unit claims)
keeps its parameters in one flat buffer of Ψ_u numbers, padded with zeros to a multiple of N_d, and rank r owns
elements [r·S, (r+1)·S) with S = ⌈Ψ_u / N_d⌉. The optimizer sees only the shards, so any elementwise optimizer
(AdamW, Lion) steps exactly as it would on the whole model.
Glossary: Ψ ``numel`` · N_d ``world_size`` · K ``state_bytes`` per parameter · P_os/P_g/P_p ``stage`` 1/2/3 ·
shard ``Unit.shard`` · bucket ``Unit`` (one per module).
Left out: fp16/bf16 compute with an fp32 master copy (see effref.pretraining.mixed_precision), gradient
accumulation over micro-batches (one backward per step), parameter groups, unused or cross-unit shared
parameters (every parameter of a unit must get its gradient every step), the contiguous-memory and activation
partitioning of ZeRO-R; FSDP's prefetch of the next unit is in effref.distributed.fsdp, CPU offload in
effref.distributed.offload.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

STAGES = (0, 1, 2, 3)


def model_state_bytes(unit_numels: Iterable[int], world_size: int, stage: int, param_bytes: int = 4,
                      grad_bytes: int = 4, state_bytes: int = 8) -> dict[str, int]:
    """The paper's per-rank bytes of parameters, gradients and optimizer states for ``stage``, with this module's
    padding: each unit of Ψ_u parameters is padded to ⌈Ψ_u / N_d⌉·N_d, so Ψ below is the padded total."""
    _check_stage(stage)
    if world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be >= 1")
    shard = sum(-(-n // world_size) for n in unit_numels)  # Ψ / N_d, padded per unit
    full = shard * world_size  # padded Ψ
    return {"parameters": param_bytes * (shard if stage == 3 else full),
            "gradients": grad_bytes * (shard if stage >= 2 else full),
            "optimizer_states": state_bytes * (full if stage == 0 else shard)}


def _check_stage(stage) -> None:
    if isinstance(stage, bool) or stage not in STAGES:
        raise ValueError(f"stage={stage!r} is not a ZeRO stage; use 0 (plain data parallelism), 1 (optimizer "
                         f"states), 2 (+ gradients) or 3 (+ parameters)")


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())  # a freed storage (stage 3) has 0 bytes


class Unit:
    """The parameters of one module as one flat, padded buffer and this rank's shard of it."""

    def __init__(self, module: nn.Module, params: list[nn.Parameter], world_size: int, rank: int) -> None:
        self.module, self.params = module, params
        self.numel = sum(p.numel() for p in params)  # Ψ_u
        self.shard_numel = -(-self.numel // world_size)  # S = ⌈Ψ_u / N_d⌉
        p0 = params[0]
        self.flat = torch.zeros(self.shard_numel * world_size, dtype=p0.dtype, device=p0.device)  # (N_d·S,)
        self.own = slice(rank * self.shard_numel, (rank + 1) * self.shard_numel)
        offset = 0
        with torch.no_grad():
            for p in params:  # every parameter becomes a view into the flat buffer
                self.flat[offset:offset + p.numel()].copy_(p.reshape(-1))
                p.data = self.flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
        self.shard: torch.Tensor | None = None  # what the optimizer updates, set by the engine
        self.full_grad: torch.Tensor | None = None  # stages 0 and 1 keep the whole gradient
        self.grads_ready = 0
        self.gather_work = None  # an all-gather in flight (FSDP's prefetch)

    def gathered(self) -> bool:
        return self.flat.untyped_storage().nbytes() > 0


class ZeroEngine:
    """Data-parallel training with ZeRO ``stage`` 0–3 on the default process group.

    ``units`` are submodules whose parameters are gathered, reduced and freed together (stage 3 frees them after
    use; a transformer's blocks are the usual choice); the model itself holds the rest. ``optimizer`` builds a
    ``torch.optim.Optimizer`` from a list of tensors (the shards), e.g. ``lambda ps: AdamW(ps, cfg)``. Use it as
    ``loss_fn(engine(x), y).backward(); engine.step(); engine.zero_grad()``.
    """

    def __init__(self, model: nn.Module, stage: int, optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
                 units: Iterable[nn.Module] = (), optimizer_device: torch.device | str | None = None) -> None:
        _check_stage(stage)
        if not callable(optimizer):
            raise TypeError(f"optimizer={optimizer!r} must build an optimizer from a list of tensors, "
                            f"e.g. lambda shards: torch.optim.AdamW(shards, lr=1e-3)")
        if optimizer_device is not None and stage == 0:
            raise ValueError("optimizer_device needs a partitioned optimizer: use stage 1, 2 or 3 with it")
        units = list(units)
        inside = {id(m) for m in model.modules()}
        if any(id(u) not in inside for u in units) or len({id(u) for u in units}) != len(units) \
                or any(u is model for u in units):
            raise ValueError("units must be distinct submodules of model (not the model itself), "
                             "e.g. units=list(model.blocks)")
        params = list(model.parameters())
        if not params or len({(p.dtype, p.device) for p in params}) != 1:
            raise ValueError("model must have parameters, all of one dtype and device; cast it first, "
                             "e.g. model.float()")
        if not dist.is_initialized():
            raise RuntimeError("ZeroEngine needs a process group: call effref.distributed.init_distributed() first "
                               "(or start the function with run_ranks / torchrun)")
        self.model, self.stage = model, stage
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        claimed: set[int] = set()
        self.units: list[Unit] = []
        for module in [*units, model]:  # the model last: it keeps what no unit claimed
            own = [p for p in module.parameters() if id(p) not in claimed]
            claimed |= {id(p) for p in own}
            if own:
                self.units.append(Unit(module, own, self.world_size, self.rank))
        for unit in self.units:
            dist.broadcast(unit.flat, src=0)  # every rank starts from rank 0's initialisation
            unit.shard = self._make_shard(unit, optimizer_device)
            for p in unit.params:
                p.register_post_accumulate_grad_hook(lambda p, unit=unit: self._on_grad(unit))
            if stage == 3:
                self._free(unit)
                unit.module.register_forward_pre_hook(lambda m, args, unit=unit: self._before_forward(unit))
                unit.module.register_forward_hook(lambda m, args, out, unit=unit: self._after_forward(unit, out))
        self.optimizer = optimizer([u.shard for u in self.units])

    def _make_shard(self, unit: Unit, optimizer_device: torch.device | str | None) -> torch.Tensor:
        if self.stage == 0:
            return unit.flat  # no partition: the optimizer updates everything
        if self.stage == 3 or optimizer_device is not None:  # a tensor of its own (offload: on the host)
            return unit.flat[unit.own].detach().to(optimizer_device or unit.flat.device, copy=True)
        return unit.flat[unit.own]  # stages 1, 2: a view, updated in place, then all-gathered

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # --- stage 3: parameters exist only around their use -------------------------------------------------------
    def _gather(self, unit: Unit, async_op: bool = False) -> None:
        """All-gather the unit's shards into its flat buffer (or finish an all-gather started earlier)."""
        if unit.gather_work is None and not unit.gathered():
            unit.flat.untyped_storage().resize_(unit.flat.numel() * unit.flat.element_size())
            shard = unit.shard.to(unit.flat.device)
            unit.gather_work = dist.all_gather_into_tensor(unit.flat, shard, async_op=True)
        if unit.gather_work is not None and not async_op:
            unit.gather_work.wait()
            unit.gather_work = None

    @staticmethod
    def _free(unit: Unit) -> None:
        unit.flat.untyped_storage().resize_(0)  # the parameters' views now point at nothing

    def _before_forward(self, unit: Unit) -> None:
        self._gather(unit)

    def _before_backward(self, unit: Unit) -> None:
        self._gather(unit)

    def _after_forward(self, unit: Unit, output) -> None:
        self._free(unit)
        outputs = [t for t in (output if isinstance(output, (tuple, list)) else (output,))
                   if isinstance(t, torch.Tensor) and t.requires_grad]
        if outputs:  # gather again as soon as the gradient reaches this unit's output
            torch.autograd.graph.register_multi_grad_hook(outputs, lambda grads: self._before_backward(unit),
                                                          mode="any")

    # --- gradients: reduced unit by unit as backward produces them ---------------------------------------------
    def _on_grad(self, unit: Unit) -> None:
        unit.grads_ready += 1
        if unit.grads_ready < len(unit.params):
            return
        unit.grads_ready = 0
        pad = unit.flat.numel() - unit.numel
        flat_grad = torch.cat([p.grad.reshape(-1) for p in unit.params]
                              + [unit.flat.new_zeros(pad)]).div_(self.world_size)  # (N_d·S,) local / N_d
        for p in unit.params:
            p.grad = None
        if self.stage == 0:
            dist.all_reduce(flat_grad)  # every rank: the whole averaged gradient
            unit.full_grad = unit.shard.grad = flat_grad
            return
        grad_shard = flat_grad.new_empty(unit.shard_numel)  # (S,)
        dist.reduce_scatter_tensor(grad_shard, flat_grad)  # rank r: the average of shard r only
        if self.stage == 1:  # the whole gradient buffer stays; only its own slice holds the average
            flat_grad[unit.own] = grad_shard
            unit.full_grad, grad_shard = flat_grad, flat_grad[unit.own]
        unit.shard.grad = grad_shard.to(unit.shard.device)
        if self.stage == 3:
            self._free(unit)

    @torch.no_grad()
    def step(self) -> None:
        """Update this rank's shards; stages 1–2 then all-gather the parameters (stage 3 gathers on use)."""
        missing = [i for i, unit in enumerate(self.units) if unit.shard.grad is None]
        if missing:
            raise RuntimeError(f"units {missing} got no gradient: call backward once before step, and give every "
                               f"parameter a part in the loss")
        self.optimizer.step()
        if self.stage in (1, 2):
            for unit in self.units:
                dist.all_gather_into_tensor(unit.flat, unit.shard.to(unit.flat.device, copy=True))

    def zero_grad(self) -> None:
        for unit in self.units:
            unit.shard.grad = unit.full_grad = None

    # --- inspection -------------------------------------------------------------------------------------------
    def model_state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds right now, read from the live tensors (call between ``step`` and ``zero_grad``
        to see the gradients)."""
        optimizer_state = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        params = [u.flat for u in self.units] + [u.shard for u in self.units]  # a view of flat counts once
        grads = [u.full_grad if u.full_grad is not None else u.shard.grad for u in self.units]
        return {"parameters": storage_bytes(params), "gradients": storage_bytes(grads),
                "optimizer_states": storage_bytes(optimizer_state)}

    @contextmanager
    def gathered_parameters(self):
        """Inside the block every parameter holds its full value (stage 3 gathers, then frees again)."""
        freed = [u for u in self.units if not u.gathered()]
        for unit in freed:
            self._gather(unit)
        try:
            yield self.model
        finally:
            for unit in freed:
                self._free(unit)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of every parameter's full value, by name (the same on every rank)."""
        with self.gathered_parameters():
            return {name: p.detach().clone() for name, p in self.model.named_parameters()}
