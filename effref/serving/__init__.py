"""Serving (survey §2.4, system level): a paged KV cache, continuous batching and a small engine.

- ``paged_attention``: attention of one decode query per sequence over scattered KV blocks (PyTorch
  reference of PagedAttention, Kwon et al. 2023); ``kernels/paged_attention.py`` is the Triton version.
- ``blocks``: reference-counted block allocator, block tables, copy-on-write, prefix sharing.
- ``paged_cache``: block pools for our Llama and a ragged forward that reads and writes them.
- ``scheduler``: iteration-level (continuous) batching with FCFS admission and preemption by recomputation or
  by swapping to a CPU block pool (Orca, Yu et al. 2022; vLLM).
- ``trace``: seeded synthetic request traces (Poisson arrivals, length distributions).
- ``engine``: ``Engine`` with ``generate``, ``stream`` and a timed ``serve``; optional speculative decoding
  and sampling (``draft=``, ``gamma=``) verified in the same ragged step, rejected drafts truncated away.
- ``drafting``: ``PagedDraft``, the draft model stepped over all drafting sequences at once on its own paged cache.
- ``bench``: the static-batching baseline with transformers' ``generate`` and KV-memory bookkeeping.
"""

from effref.serving.blocks import BlockAllocator, BlockManager, BlockTable, OutOfBlocksError
from effref.serving.engine import Engine
from effref.serving.paged_attention import gather_kv, paged_attention
from effref.serving.paged_cache import PagedKVCache, RaggedBatch, paged_forward
from effref.serving.scheduler import Scheduler, Sequence
from effref.serving.trace import TraceConfig, TraceRequest, make_trace

__all__ = ["BlockAllocator", "BlockManager", "BlockTable", "Engine", "OutOfBlocksError", "PagedKVCache",
           "RaggedBatch", "Scheduler", "Sequence", "TraceConfig", "TraceRequest", "gather_kv", "make_trace",
           "paged_attention", "paged_forward"]
