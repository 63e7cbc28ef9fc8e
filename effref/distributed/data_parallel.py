"""Data parallelism: every rank holds the whole model, sees its own slice of the batch, and averages gradients.

Paper: the survey's §2.2 (system level) and, for the bucketed all-reduce that overlaps backward, Li, Zhao,
Varma, Salpekar, Noordhuis, Li, Paszke, Smith, Vaughan, Damania, Chintala (2020), "PyTorch Distributed:
Experiences on Accelerating Data Parallel Training", VLDB, arXiv:2006.15704 — §3.2 (gradient bucketing,
overlap with backward).
Implements: for a global batch of B rows on N ranks, rank r computes ∇L_r on its B/N rows; the all-reduce
    g = (1/N) · Σ_r ∇L_r
equals the gradient of the mean loss over all B rows (each L_r is a mean over B/N rows), so the optimizer, run
identically on every rank, takes the step single-process training takes on the whole batch. Gradients are
grouped in buckets in reverse registration order (backward produces the last layers first); a bucket's
all-reduce is issued, without waiting, as soon as its last gradient is accumulated, and the step waits for all of
them at the end of backward.
Glossary: N ``world_size`` · r ``rank`` · B the global batch · bucket ``bucket_numel`` numbers at most.
Left out: ``no_sync`` gradient accumulation, unused-parameter detection, bucket re-ordering after the first
step, buffers other than parameters kept in sync after construction, and gradient compression hooks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def split_batch(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of ``batch`` rows (B must be a multiple of ``world_size``)."""
    if batch.shape[0] % world_size:
        raise ValueError(f"batch of {batch.shape[0]} rows does not split over world_size={world_size}; "
                         f"use a global batch that is a multiple of {world_size}")
    rows = batch.shape[0] // world_size
    return batch[rank * rows:(rank + 1) * rows]


class _Bucket:
    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params, self.ready, self.flat, self.work = params, 0, None, None


class DataParallel(nn.Module):
    """Wrap ``module`` so that backward leaves every rank with the gradient averaged over all ranks."""

    def __init__(self, module: nn.Module, bucket_numel: int = 2 ** 20) -> None:
        super().__init__()
        if not isinstance(bucket_numel, int) or bucket_numel < 1:
            raise ValueError(f"bucket_numel={bucket_numel!r} must be a positive int (numbers per all-reduce)")
        if not dist.is_initialized():
            raise RuntimeError("DataParallel needs a process group: call effref.distributed.init_distributed() "
                               "first (or start the function with run_ranks / torchrun)")
        self.module, self.world_size = module, dist.get_world_size()
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor, src=0)  # every rank starts from rank 0's weights
        self.buckets: list[_Bucket] = []
        current: list[nn.Parameter] = []
        for p in reversed([p for p in module.parameters() if p.requires_grad]):
            if current and sum(q.numel() for q in current) + p.numel() > bucket_numel:
                self.buckets.append(_Bucket(current))
                current = []
            current.append(p)
        if current:
            self.buckets.append(_Bucket(current))
        for bucket in self.buckets:
            for p in bucket.params:
                p.register_post_accumulate_grad_hook(lambda p, bucket=bucket: self._on_grad(bucket))
        self._waiting = False

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _on_grad(self, bucket: _Bucket) -> None:
        if not self._waiting:  # first gradient of this backward: wait for every bucket when backward ends
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._waiting = True
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            bucket.flat = torch.cat([p.grad.reshape(-1) for p in bucket.params]).div_(self.world_size)
            bucket.work = dist.all_reduce(bucket.flat, async_op=True)  # overlaps the rest of backward

    def _finish(self) -> None:
        self._waiting = False
        for bucket in self.buckets:
            if bucket.work is None:
                raise RuntimeError("a parameter got no gradient in this backward; DataParallel needs every "
                                   "parameter to take part in the loss")
            bucket.work.wait()
            offset = 0
            for p in bucket.params:
                p.grad.copy_(bucket.flat[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()
            bucket.ready, bucket.flat, bucket.work = 0, None, None
