"""Pipeline parallelism: consecutive layers on consecutive ranks, the batch cut into micro-batches.

Papers: Huang et al. (2019), "GPipe", arXiv:1811.06965 — all forwards, then all backwards;
Narayanan et al. (2019), "PipeDream", and (2021), "Efficient large-scale language model training on GPU
clusters using Megatron-LM", arXiv:2104.04473, §2.2 — the 1F1B schedule (one forward, one backward, in turn).
Implements: p stages (one rank each) and m micro-batches. A schedule is data: for every stage, the ordered
list of operations ("F", i) and ("B", i). ``simulate_schedule`` times a schedule from its dependencies alone
(F of stage s waits for F of stage s − 1, B waits for B of stage s + 1) and counts the idle time. With
forward time t_f and backward time t_b per micro-batch and stage, both schedules finish after
(m + p − 1)(t_f + t_b), so the bubble is
    idle fraction = (p − 1) / (m + p − 1);
1F1B keeps at most p − s micro-batches' activations alive on stage s instead of GPipe's m.
``pipeline_train_step`` runs a schedule on real ranks: activations go forward and their gradients backward
by point-to-point send/recv, every micro-batch's loss is scaled by 1/m, so the accumulated gradients are
those of the whole batch — the same as one process computing it at once.
Glossary: p stages = world size · m ``micro_batches`` · s stage index = rank · t_f, t_b ``forward_time``,
          ``backward_time``.
Left out: interleaved (virtual-stage) 1F1B, PipeDream's weight stashing (asynchronous updates), combining the
pipeline with data or tensor parallelism, and overlapping the transfers with compute.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

Op = tuple[str, int]  # ("F" or "B", micro-batch index)


def _check(stages: int, micro_batches: int) -> None:
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages={stages!r} must be an int ≥ 1 (one per rank)")
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches={micro_batches!r} must be an int ≥ 1")


def gpipe_schedule(stages: int, micro_batches: int) -> list[list[Op]]:
    """GPipe: every stage runs the m forwards, then the m backwards (in reverse order)."""
    _check(stages, micro_batches)
    return [[("F", i) for i in range(micro_batches)] + [("B", i) for i in reversed(range(micro_batches))]
            for _ in range(stages)]


def one_f_one_b_schedule(stages: int, micro_batches: int) -> list[list[Op]]:
    """1F1B: stage s warms up with p − s − 1 forwards, then alternates one forward and one backward."""
    _check(stages, micro_batches)
    schedule = []
    for stage in range(stages):
        warmup = min(stages - stage - 1, micro_batches)
        ops = [("F", i) for i in range(warmup)]
        for i in range(micro_batches - warmup):  # steady state: F of micro-batch warmup + i, B of i
            ops += [("F", warmup + i), ("B", i)]
        ops += [("B", i) for i in range(micro_batches - warmup, micro_batches)]  # cool-down
        schedule.append(ops)
    return schedule


@dataclass
class Timeline:
    events: list[tuple[int, str, int, float, float]]  # (stage, "F"/"B", micro-batch, start, end)
    makespan: float
    bubble: float  # idle share of stages × makespan
    peak_in_flight: list[int]  # per stage: most micro-batches whose activations are held at once


def simulate_schedule(schedule: list[list[Op]], forward_time: float = 1.0,
                      backward_time: float = 2.0) -> Timeline:
    """Time a schedule: each operation starts when its stage is free and the operation it needs is done."""
    if forward_time <= 0 or backward_time <= 0:
        raise ValueError(f"forward_time={forward_time} and backward_time={backward_time} must be > 0")
    stages = len(schedule)
    done: dict[tuple[int, str, int], float] = {}
    position, free_at, events = [0] * stages, [0.0] * stages, []
    while any(position[s] < len(schedule[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            if position[s] == len(schedule[s]):
                continue
            kind, i = schedule[s][position[s]]
            needs = [(s, "F", i)] if kind == "B" else []  # a backward needs this stage's own forward
            if kind == "F" and s > 0:
                needs.append((s - 1, "F", i))
            if kind == "B" and s < stages - 1:
                needs.append((s + 1, "B", i))
            if any(need not in done for need in needs):
                continue
            start = max([free_at[s]] + [done[need] for need in needs])
            end = start + (forward_time if kind == "F" else backward_time)
            done[(s, kind, i)], free_at[s] = end, end
            events.append((s, kind, i, start, end))
            position[s] += 1
            progressed = True
        if not progressed:
            stuck = [schedule[s][position[s]] for s in range(stages) if position[s] < len(schedule[s])]
            raise ValueError(f"the schedule deadlocks: the next operations {stuck} wait on each other")
    makespan = max(free_at)
    busy = sum(end - start for *_, start, end in events)
    return Timeline(events, makespan, 1 - busy / (stages * makespan), [_peak(ops) for ops in schedule])


def _peak(ops: list[Op]) -> int:
    held = peak = 0
    for kind, _ in ops:
        held += 1 if kind == "F" else -1
        peak = max(peak, held)
    return peak


def split_layers(n_layers: int, stages: int) -> list[range]:
    """Contiguous layer ranges, one per stage, as even as possible (the first stages take the remainder)."""
    if stages > n_layers:
        raise ValueError(f"stages={stages} exceeds the model's {n_layers} layers; "
                         f"use at most {n_layers} ranks")
    size, extra = divmod(n_layers, stages)
    bounds = [0]
    for s in range(stages):
        bounds.append(bounds[-1] + size + (s < extra))
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


@dataclass
class StepResult:
    loss: float | None  # the whole batch's mean loss (last stage only)
    events: list[tuple[str, int, float, float]]  # ("F"/"B", micro-batch, start, end) of the compute, in s
    sent_bytes: int  # activations and gradients this rank sent


def pipeline_train_step(stage: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn,
                        micro_batches: int, schedule: str = "1f1b", group=None) -> StepResult:
    """Run one pipelined forward and backward of ``stage`` on this rank; gradients accumulate in ``stage``.

    Every rank passes the whole batch: stage 0 reads ``inputs``, the last stage ``targets``. Each stage must
    map a (b, …, D) tensor to one of the same shape (hidden layers of a fixed width), so that receive buffers
    are known in advance.
    """
    rank, stages = dist.get_rank(group), dist.get_world_size(group)
    if schedule not in ("gpipe", "1f1b"):
        raise ValueError(f"schedule={schedule!r} must be 'gpipe' or '1f1b'")
    _check(stages, micro_batches)
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs hold {inputs.shape[0]} samples but targets {targets.shape[0]}; "
                         "pass one target per input")
    if inputs.shape[0] % micro_batches:
        raise ValueError(f"micro_batches={micro_batches} does not divide the batch of {inputs.shape[0]}; "
                         "use a divisor of the batch size")
    ops = (gpipe_schedule if schedule == "gpipe" else one_f_one_b_schedule)(stages, micro_batches)[rank]
    x_parts, y_parts = inputs.chunk(micro_batches), targets.chunk(micro_batches)
    peer = {s: dist.get_global_rank(group, s) if group is not None else s for s in range(stages)}
    saved, pending, events, sent, total = {}, [], [], 0, 0.0
    clock = time.perf_counter()
    for kind, i in ops:  # each operation: wait for its input, compute (timed), send without waiting
        if kind == "F":
            if rank == 0:
                x = x_parts[i]
            else:
                x = torch.empty_like(x_parts[i])
                dist.recv(x, src=peer[rank - 1], group=group)
                x.requires_grad_()
            start = time.perf_counter() - clock
            y = stage(x)  # (b, …, D)
            if rank == stages - 1:
                y = loss_fn(y, y_parts[i]) / micro_batches  # the batch mean is the mean of the micro means
                total += y.item()
            else:
                out = y.detach()
                pending.append((dist.isend(out, dst=peer[rank + 1], group=group), out))  # keep `out` alive
                sent += y.numel() * y.element_size()
            saved[i] = (x, y)
        else:
            x, y = saved.pop(i)
            grad = None
            if rank < stages - 1:
                grad = torch.empty_like(y)
                dist.recv(grad, src=peer[rank + 1], group=group)
            start = time.perf_counter() - clock
            y.backward(grad)
            if rank > 0:
                pending.append((dist.isend(x.grad, dst=peer[rank - 1], group=group), x.grad))
                sent += x.grad.numel() * x.grad.element_size()
        events.append((kind, i, start, time.perf_counter() - clock))
    for work, _ in pending:
        work.wait()
    return StepResult(total if rank == stages - 1 else None, events, sent)
