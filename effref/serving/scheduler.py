"""Iteration-level scheduling (continuous batching) over a paged KV cache, with preemption by recomputation.

Papers: Yu, Jeong, Kim, Kim, Chun (2022), "Orca: A Distributed Serving System for Transformer-Based Generative
Models", OSDI '22 — §4.1 (iteration-level scheduling), §4.2 (selective batching); Kwon et al. (2023),
arXiv:2309.06180 — §4.5 (first-come-first-served scheduling, all-or-nothing preemption, recomputation).
Implements: the batch is rebuilt at every model iteration instead of once per request batch. Each
``schedule()`` call
  1. gives every running sequence a cache slot for its newest token, oldest request first; when no block is
     free, the most recently admitted running sequence is preempted, all or nothing: with
     ``preemption="recompute"`` its blocks are freed and it returns to the front of the waiting queue, to be
     recomputed later from prompt + the tokens it already produced; with ``"swap"`` its blocks are copied to
     a CPU block pool (``num_cpu_blocks``) and it waits in the swapped queue (recomputation when that pool
     is full);
  2. if nothing was preempted, swaps sequences back in (oldest first) when their blocks plus one fit, and
     then, if none is left swapped, admits waiting sequences in arrival order (FCFS: it stops at the first
     one that does not fit) while the batch has room (``max_batch``), the step's token budget
     (``max_step_tokens``) allows, and the block pool can hold their tokens (sharing cached prefix blocks).
``commit`` appends the sampled tokens (several at once after a speculative step, cutting the block table back
past rejected drafts) and retires finished sequences, whose blocks return to the pool at once, so the next
iteration can admit new work — the point of iteration-level scheduling.
Glossary: waiting / running / swapped queues · a step = one forward over the scheduled sequences' new tokens
          · ``num_computed`` tokens of a sequence whose keys/values are in the cache.
Left out: priorities other than arrival order, chunked prefill, a free-block watermark; blocks shared with
          other sequences are swapped as private copies (sharing is not restored after a swap-in).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from effref.serving.blocks import BlockAllocator, BlockManager, BlockTable


@dataclass
class Sequence:
    """One request in flight: its prompt, what it has produced, and where its keys/values live."""

    request_id: int
    prompt: list[int]
    max_new_tokens: int
    arrival: float = 0.0
    eos_id: int | None = None
    generator: torch.Generator | None = None  # its own random stream, so sampling does not depend on the batch
    output: list[int] = field(default_factory=list)
    table: BlockTable | None = None
    num_computed: int = 0
    status: str = "waiting"  # waiting | running | swapped | finished
    preemptions: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def finished(self) -> bool:
        return len(self.output) >= self.max_new_tokens or (
            self.eos_id is not None and bool(self.output) and self.output[-1] == self.eos_id)


@dataclass
class Step:
    """What one model iteration computes: for each sequence, its tokens from ``starts[i]`` on."""

    seqs: list[Sequence]
    starts: list[int]
    copies: list[tuple[int, int]]  # copy-on-write block copies to apply before the forward
    preempted: list[Sequence]
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, CPU block): copy first
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (CPU block, device block)


class Scheduler:
    """FCFS continuous batching with waiting and running queues (see the module docstring)."""

    def __init__(self, manager: BlockManager, max_batch: int = 8, max_step_tokens: int = 512,
                 max_seq_len: int | None = None, preemption: str = "recompute", num_cpu_blocks: int = 0):
        if max_batch < 1 or max_step_tokens < 1:
            raise ValueError(f"max_batch={max_batch} and max_step_tokens={max_step_tokens} must be >= 1")
        if preemption not in ("recompute", "swap") or (preemption == "swap") != (num_cpu_blocks > 0):
            raise ValueError(f"preemption={preemption!r} with num_cpu_blocks={num_cpu_blocks}: use 'recompute' "
                             "(and no CPU blocks) or 'swap' with num_cpu_blocks >= 1")
        self.preemption = preemption
        self.cpu = BlockAllocator(num_cpu_blocks) if num_cpu_blocks else None  # swap space
        self.manager, self.max_batch, self.max_step_tokens = manager, max_batch, max_step_tokens
        self.capacity = manager.allocator.num_blocks * manager.block_size  # tokens the whole pool holds
        self.max_seq_len = max_seq_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()

    def add(self, seq: Sequence) -> None:
        total = len(seq.prompt) + seq.max_new_tokens
        if not seq.prompt or seq.max_new_tokens < 1:
            raise ValueError(f"request {seq.request_id}: need a non-empty prompt and max_new_tokens >= 1, got "
                             f"{len(seq.prompt)} prompt tokens and max_new_tokens={seq.max_new_tokens}")
        if total > self.capacity:
            raise ValueError(f"request {seq.request_id} needs up to {total} tokens of KV cache "
                             f"({len(seq.prompt)} prompt + {seq.max_new_tokens} new) but the whole cache holds "
                             f"{self.capacity}; create the engine with more blocks or ask for fewer tokens")
        if self.max_seq_len is not None and total > self.max_seq_len:
            raise ValueError(f"request {seq.request_id} needs {total} positions but the model's max_seq_len is "
                             f"{self.max_seq_len}; shorten the prompt or ask for fewer new tokens")
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def _preempt(self, seq: Sequence, swap_out: list[tuple[int, int]]) -> None:
        """Swap the sequence's blocks to the CPU pool if there is room, else drop them for recomputation."""
        seq.preemptions += 1
        if self.cpu is not None and self.cpu.num_free >= len(seq.table.blocks):
            cpu_table = BlockTable(self.manager.block_size, [self.cpu.allocate() for _ in seq.table.blocks],
                                   list(seq.table.tokens))
            swap_out += zip(seq.table.blocks, cpu_table.blocks)
            self.manager.free(seq.table)  # the copy is taken before this step writes anything
            seq.table, seq.status = cpu_table, "swapped"
            self.swapped.append(seq)
            return
        self.manager.free(seq.table)
        seq.table, seq.num_computed, seq.status = None, 0, "waiting"
        self.waiting.appendleft(seq)

    def schedule(self) -> Step:
        copies: list[tuple[int, int]] = []
        preempted: list[Sequence] = []
        swap_out: list[tuple[int, int]] = []
        swap_in: list[tuple[int, int]] = []
        queue, self.running = self.running, []
        while queue:  # 1. one more slot for every running sequence, oldest first
            seq = queue.pop(0)
            while not self.manager.can_append(seq.table) and queue:
                victim = queue.pop()  # the newest admission gives way
                self._preempt(victim, swap_out)
                preempted.append(victim)
            if not self.manager.can_append(seq.table):
                self._preempt(seq, swap_out)
                preempted.append(seq)
                continue
            copy = self.manager.append(seq.table, seq.tokens[-1])
            if copy is not None:
                copies.append(copy)
            self.running.append(seq)
        while self.swapped and not preempted and len(self.running) < self.max_batch:  # 2a. swap back in
            seq = self.swapped[0]
            if self.manager.num_free < len(seq.table.blocks) + 1:  # its blocks + room for its next token
                break
            self.swapped.popleft()
            table = BlockTable(self.manager.block_size, [self.manager.allocator.allocate() for _ in
                                                          seq.table.blocks], seq.table.tokens)
            swap_in += zip(seq.table.blocks, table.blocks)
            for block in seq.table.blocks:
                self.cpu.free(block)
            seq.table, seq.status = table, "running"
            self.manager.append(table, seq.tokens[-1])  # fresh private blocks: never a copy
            self.running.append(seq)
        budget = self.max_step_tokens - len(self.running)
        while self.waiting and not preempted and not self.swapped and len(self.running) < self.max_batch:  # 2b
            seq = self.waiting[0]
            need = len(seq.tokens)
            if (need > budget and self.running) or not self.manager.can_allocate(seq.tokens):
                break
            self.waiting.popleft()
            seq.table, seq.num_computed = self.manager.allocate(seq.tokens)
            seq.status = "running"
            budget -= need - seq.num_computed
            self.running.append(seq)
        return Step(list(self.running), [s.num_computed for s in self.running], copies, preempted, swap_out,
                    swap_in)

    def commit(self, step: Step, tokens: list[int | list[int]]) -> list[Sequence]:
        """Record each scheduled sequence's next token (or several: accepted speculative drafts plus the
        target's token); returns (and releases) the sequences that finished.

        Tokens past ``max_new_tokens`` or an EOS are dropped. The table is cut back to the tokens whose
        keys/values are valid (all but the newest), releasing the slots of rejected drafts.
        """
        done = []
        for seq, new in zip(step.seqs, tokens):
            for token in new if isinstance(new, (list, tuple)) else [new]:
                seq.output.append(int(token))
                if seq.finished:
                    break
            seq.num_computed = len(seq.tokens) - 1  # the newest token's keys/values come with the next step
            if not seq.finished:
                self.manager.truncate(seq.table, seq.num_computed)
            else:
                seq.status = "finished"
                self.manager.free(seq.table)
                seq.table = None
                self.running.remove(seq)
                done.append(seq)
        return done
