"""Serving measurements: the static-batching baseline, KV-memory utilisation by bookkeeping, latency percentiles.

Papers: Kwon et al. (2023), arXiv:2309.06180 (vLLM) — §3 and Fig. 2 (share of reserved KV memory that holds
token states: Orca-style contiguous reservation of the maximum length, of the next power of two of the real
length, or of exactly the real length ("oracle"), vs paging), §6 (normalized latency, throughput);
Yu et al. (2022), Orca, OSDI '22 — §2.2 (request-level "static" batching and its waste).
Implements:
  ``serve_static``: request-level batching with transformers' ``generate``: wait until ``batch_size`` requests
  have arrived (or the trace ends), left-pad their prompts, generate max(o_i) tokens for all of them (a request stops only
  when its whole batch does), then take the next batch. Same serving clock as ``Engine.serve`` (measured
  compute time, idle gaps skipped).
  ``kv_utilisation``: replays a trace through the real ``Scheduler`` and ``BlockManager`` without a model
  (every step appends one token per running sequence) and, at every step, divides the token slots that hold
  a token, Σ_i len_i, by the slots reserved under each policy: paged Σ_i b·⌈len_i / b⌉; contiguous
  "max" Σ_i max_len; "pow2" Σ_i 2^⌈log2(p_i + o_i)⌉; "oracle" Σ_i (p_i + o_i); summed over steps.
Glossary: p_i prompt length · o_i output length · len_i tokens cached now · b block_size.
Left out: external fragmentation of contiguous allocators (the paper's Fig. 2 counts it too, so its contiguous
          numbers are lower than pure reservation waste).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from effref.serving.blocks import BlockManager
from effref.serving.scheduler import Scheduler, Sequence
from effref.serving.trace import TraceRequest


@dataclass
class Finished:
    """A served request on the serving clock (seconds)."""

    arrival: float
    finish_time: float
    output: list[int]


@torch.no_grad()
def serve_static(hf_model, requests: Seq[tuple[float, Seq[int], int]], batch_size: int, pad_id: int,
                 progress=None) -> list[Finished]:
    """Replay (arrival, prompt, new tokens) requests through transformers' ``generate`` in static batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    pending, clock, done = sorted(requests, key=lambda r: r[0]), 0.0, []
    while pending:
        batch, pending = pending[:batch_size], pending[batch_size:]
        clock = max(clock, batch[-1][0])  # wait until the batch is full (or the trace ends)
        width, n_new = max(len(r[1]) for r in batch), max(r[2] for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # left padding
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (_, prompt, _) in enumerate(batch):
            ids[row, width - len(prompt):] = torch.as_tensor(list(prompt))
            mask[row, width - len(prompt):] = 1
        ids, mask = ids.to(hf_model.device), mask.to(hf_model.device)
        start = time.perf_counter()
        out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                                do_sample=False, pad_token_id=pad_id)  # (B, width + n_new)
        clock += time.perf_counter() - start
        for row, (arrival, _, n) in enumerate(batch):
            done.append(Finished(arrival, clock, out[row, width:width + n].tolist()))
        if progress is not None:
            progress.update(len(batch))
    return done


def kv_utilisation(trace: Seq[TraceRequest], num_blocks: int, block_size: int = 16, max_batch: int = 256,
                   max_len: int = 2048) -> dict[str, float]:
    """Share of reserved KV slots that hold a token, per reservation policy, over a model-free replay."""
    manager = BlockManager(num_blocks, block_size, share_prefixes=False)  # distinct prompts: nothing to share
    scheduler = Scheduler(manager, max_batch=max_batch, max_step_tokens=10**9, max_seq_len=max_len)
    for r in trace:
        scheduler.add(Sequence(r.request_id, [1] * r.prompt_len, r.output_len))
    held = {"paged": 0, "max": 0, "pow2": 0, "oracle": 0}
    stored = 0
    while scheduler.has_work:
        step = scheduler.schedule()
        for seq in step.seqs:
            full = len(seq.prompt) + seq.max_new_tokens
            stored += seq.table.num_tokens
            held["paged"] += len(seq.table.blocks) * block_size
            held["max"] += max_len
            held["pow2"] += 2 ** math.ceil(math.log2(full))
            held["oracle"] += full
        scheduler.commit(step, [0] * len(step.seqs))
    return {policy: stored / slots for policy, slots in held.items()}


def latency_percentiles(done: Seq, quantiles: Seq[float] = (0.5, 0.9, 0.99)) -> dict[str, float]:
    """Percentiles of end-to-end latency (finish − arrival, seconds) over finished requests."""
    latency = torch.tensor([d.finish_time - d.arrival for d in done], dtype=torch.float64)
    return {f"p{round(q * 100)}": float(latency.quantile(q)) for q in quantiles}
