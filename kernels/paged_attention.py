"""PagedAttention decode in Triton: attend to a sequence's KV blocks where they lie, split across programs.

Paper: Kwon, Li, Zhuang, Sheng, Zheng, Yu, Gonzalez, Zhang, Stoica (2023), "Efficient Memory Management for
Large Language Model Serving with PagedAttention", arXiv:2309.06180 — §4.1, Eq. 4: block-wise attention, as
in vLLM's first kernel ("V1", where one thread block walks a whole sequence). The sequence split is not
described in the paper: it follows vLLM's "V2" kernel from its code base, which cuts long contexts into
partitions and merges them with a log-sum-exp reduction, the one of Flash-Decoding (Dao, Haziza, Massa, Sizov
2023, PyTorch blog). The online softmax is FlashAttention's (Dao et al., 2022, arXiv:2205.14135, Algorithm 1).

A serving engine keeps each layer's KV cache as a pool of fixed-size blocks and gives every sequence a
block table: its j-th cached token sits in block ``block_tables[i, j // block_size]`` at slot
``j % block_size``. The PyTorch reference (``effref.serving.paged_attention.paged_attention``) first gathers
those blocks into a dense copy and then runs ordinary attention: the cache is read, written again as a
padded copy, and read a third time. This kernel reads every cached key and value exactly once, in place,
and keeps the softmax running in registers:

    s_j = q·k_j / √d,   m' = max(m, max_j s_j),   ℓ' = ℓ·e^{m − m'} + Σ_j e^{s_j − m'},
    acc' = acc·e^{m − m'} + Σ_j e^{s_j − m'} v_j,   o = acc / ℓ   after the last tile.

One program serves one (sequence, key/value head, split) and all G = n_heads / n_kv_heads query heads that
share the KV head (grouped-query attention), so each key is loaded once for the whole group, not G times. A
loop step covers BLOCK_N consecutive token positions; each position finds its physical block through the
table, so a step may straddle several cache blocks and the cache block size need not be a power of two.

The split. With one split per sequence, the grid is B·H_kv programs: 64 for 8 sequences of a Llama-3-8B
layer (8 KV heads), on a GPU with 132 SMs. The third grid axis cuts positions [0, capacity) into S chunks
(capacity = max_blocks · block_size, the longest context the tables can describe, known on the host without
reading the lengths back from the GPU); split s attends to tokens [s·chunk, min((s+1)·chunk, L_i)) and
returns o_s and λ_s = log Σ_{j∈s} e^{x_j}. A sequence shorter than a split's start gets an empty split
(λ_s = −∞), which the combine weighs 0: o = Σ_s e^{λ_s − λ} o_s, λ = log Σ_s e^{λ_s}, exact. With S = 1 the
program writes o itself: no partial buffers and no combine launch, the unsplit kernel's cost.

Why it is memory-bound. Decoding scores one query against L cached tokens: 4·L·d FLOPs per query head
against 2·L·d cached values read per KV head, i.e. about 2·G/elt_bytes FLOPs per byte — far below any
GPU's ridge point. The roofline is the time to read the cache once: ``paged_attention_bytes`` below. A
split adds S·(d + 1) fp32 partials per query head (written once, read once by the combine), small next to
the L·d cache values each KV head reads when chunks hold hundreds of tokens.

Glossary: q (B, H, d) one decode query per sequence · K, V blocks (num_blocks, block_size, H_kv, d)
          · block_tables (B, max_blocks) · context_lens (B,) = L_i · G = H / H_kv query heads per KV head
          · S ``num_splits`` · chunk tokens per split · o_s, λ_s partial output and log-sum-exp of split s
          · m running max, ℓ running sum, acc running Σ p·v (all per query head, fp32)
          · BLOCK_N tokens per loop step · BLOCK_G = G padded to a power of two (≥ 16 for GPU tl.dot).
Left out: vLLM's fixed 512-token partitions sized from the longest context (which its scheduler knows on the
host; ours are sized from the table width so that no length is read back); ALiBi, sliding windows, quantized
(fp8/int8) blocks; prefill with more than one query token per sequence.
"""

from __future__ import annotations

import math

import torch

from effref import kernels
from effref.kernels._attention import (  # shared with kernels/flash_decoding.py; re-exported here
    LOG2E,
    SUPPORTED_DTYPES,
    check_splits_and_step,
    combine_splits,
    decode_launch_config,
    default_num_splits,
    finish_split,
    online_softmax_step,
    sdpa_decode,
    tokens_per_split,
)
from effref.kernels._runtime import Benchmark, check_device, check_same_device, require_triton, tl, triton
from effref.serving.paged_attention import paged_attention as paged_attention_reference


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr, o_ptr, lse_ptr,  # q (B, H, d); k, v (num_blocks, bs, H_kv, d);
    # bt (B, max_blocks); o = out (B, H, d) in q's dtype, or with SPLIT o_s (B, H, S, d) and λ_s (B, H, S) fp32
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_bt, stride_ob, stride_oh, stride_os, stride_lb, stride_lh, chunk, d_head, qk_scale,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    heads = kv_head * GROUP + tl.arange(0, BLOCK_G)  # (BLOCK_G,) the query heads that read this KV head
    head_ok = tl.arange(0, BLOCK_G) < GROUP
    dims = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    dim_ok = dims < d_head
    context_len = tl.load(len_ptr + seq)
    first = split * chunk  # this split's tokens: [first, last)
    last = tl.minimum(first + chunk, context_len)  # ≤ first when the sequence ends before the split: empty

    # MEMORY-TRAFFIC: reads G·d query values once per program (S·B·H·d in all, small next to the cache).
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)
    if UPCAST:  # fp32 math: the interpreter gets 16-bit arithmetic wrong
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for start in range(first, last, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,) logical positions in the sequence
        valid = tokens < last
        # MEMORY-TRAFFIC: reads one int32 block id per token (one per cache block after caching: 4 bytes
        # per block_size tokens).
        block = tl.load(bt_ptr + seq * stride_bt + tokens // BLOCK_SIZE, mask=valid, other=0)  # (BLOCK_N,)
        block = block.to(tl.int64)  # a pool of num_blocks · bs · H_kv · d elements may pass 2³¹
        slot = tokens % BLOCK_SIZE
        kv_mask = valid[:, None] & dim_ok[None, :]
        # MEMORY-TRAFFIC: reads BLOCK_N·d keys and BLOCK_N·d values of this KV head: the cache's only read
        # (the splits of one sequence cover disjoint tokens).
        k = tl.load(k_ptr + block[:, None] * stride_kb + slot[:, None] * stride_kt + kv_head * stride_kh
                    + dims[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vt + kv_head * stride_vh
                    + dims[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        m_i, l_i, acc = online_softmax_step(q, k, v, valid, m_i, l_i, acc, qk_scale, IEEE)

    out, lse = finish_split(m_i, l_i, acc)  # (BLOCK_G, BLOCK_D) o_s, (BLOCK_G,) λ_s; zeros and −inf when empty
    # MEMORY-TRAFFIC: writes G·d outputs, rounded from fp32 to q's dtype (S = 1), or G·(d + 1) fp32 partials.
    tl.store(o_ptr + seq * stride_ob + heads[:, None] * stride_oh + split * stride_os + dims[None, :],
             out.to(o_ptr.dtype.element_ty), mask=head_ok[:, None] & dim_ok[None, :])
    if SPLIT:
        tl.store(lse_ptr + seq * stride_lb + heads * stride_lh + split, lse, mask=head_ok)


def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float | None = None,
                           num_splits: int | None = None, *, block_n: int | None = None,
                           check_values: bool = True) -> torch.Tensor:
    """Decode attention over a paged KV cache in Triton: q (B, H, d) → (B, H, d) in q's dtype.

    Same contract as ``effref.serving.paged_attention.paged_attention``: ``k_cache``/``v_cache`` are
    (num_blocks, block_size, H_kv, d) pools, ``block_tables`` (B, max_blocks) int32 lists each sequence's
    blocks in order, ``context_lens`` (B,) int32 counts its cached tokens; head h reads KV head
    h // (H / H_kv); ``scale`` defaults to 1/√d. ``num_splits`` is S, the programs that share one
    (sequence, KV head): None asks ``default_num_splits`` (about two programs per SM, at least 256 of the
    table's max_blocks · block_size positions per split); 1 is one kernel launch that writes the output
    directly; S > 1 adds fp32 partials and the log-sum-exp combine. The splits cut the table's capacity, so
    trim ``block_tables`` to the columns the longest sequence uses (a free view) if it is much wider.
    ``block_n`` overrides the tokens per loop step (tests use it to force many steps). ``check_values``
    reads the lengths and block ids back to the host to check their range, which synchronises with the GPU:
    an engine that builds its own tables may turn it off.
    """
    require_triton("paged_attention")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("context_lens", context_lens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}; convert with torch.as_tensor")
    if q.dim() != 3:
        raise ValueError(f"q.shape={tuple(q.shape)} must be (B, n_heads, d_head), one decode query per "
                         "sequence; for a single token per sequence use q[:, :, 0] of a (B, H, 1, d) tensor")
    B, H, d = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache.shape={tuple(k_cache.shape)} and v_cache.shape={tuple(v_cache.shape)} must "
                         "be equal and (num_blocks, block_size, n_kv_heads, d_head)")
    num_blocks, block_size, H_kv, d_cache = k_cache.shape
    if d_cache != d:
        raise ValueError(f"k_cache has d_head={d_cache} but q has d_head={d}; they must match")
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"n_heads={H} is not a multiple of n_kv_heads={H_kv}; each key/value head must serve "
                         "a whole group of query heads")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}.dtype={t.dtype} is not supported; convert with .float(), .half() or "
                            ".bfloat16()")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q, k_cache and v_cache must share one dtype, got {q.dtype}, {k_cache.dtype} and "
                        f"{v_cache.dtype}; convert q with .to(k_cache.dtype)")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name}.dtype={t.dtype} must be an integer type; convert with .to(torch.int32)")
    if block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"block_tables.shape={tuple(block_tables.shape)} must be (B, max_blocks) with B={B} "
                         "rows, one per sequence of q")
    if context_lens.shape != (B,):
        raise ValueError(f"context_lens.shape={tuple(context_lens.shape)} must be (B,) = ({B},)")
    capacity = block_tables.shape[1] * block_size  # the longest context the tables describe: no GPU read
    check_same_device("q", q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                      context_lens=context_lens)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need a contiguous last (d_head) dimension; a cache pool is too "
                         "large to copy per call, so allocate it with torch.empty(num_blocks, block_size, "
                         "n_kv_heads, d_head)")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale!r} must be a positive finite number, or None for 1/sqrt(d_head)")
    check_splits_and_step(num_splits, block_n)
    if torch.is_grad_enabled() and q.requires_grad:
        raise RuntimeError("paged_attention_decode has no backward pass, but q requires grad; call it under "
                           "torch.no_grad(), or use effref.serving.paged_attention.paged_attention")
    if check_values and B:
        lo, hi = int(context_lens.min()), int(context_lens.max())
        if lo < 1 or hi > capacity:
            raise ValueError(f"context_lens must lie in [1, max_blocks * block_size = {capacity}], got min {lo}, "
                             f"max {hi}; drop empty sequences from the batch, or widen block_tables")
        n_used = (context_lens.long() + block_size - 1) // block_size  # (B,) blocks each sequence reads
        used = torch.arange(block_tables.shape[1], device=q.device)[None, :] < n_used[:, None]  # (B, max_blocks)
        ids = block_tables[used]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ValueError(f"block_tables holds block id {bad} outside [0, num_blocks={num_blocks}) among "
                             "the blocks a sequence reads; fix the table (entries past a sequence's last "
                             "block are ignored)")
    check_device("q", q)

    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables = block_tables.to(torch.int32)
    context_lens = context_lens.to(torch.int32).contiguous()
    out = torch.empty((B, H, d), dtype=q.dtype, device=q.device)  # (B, H, d)
    if B == 0 or H == 0:
        return out
    group = H // H_kv
    S = default_num_splits(B, H_kv, capacity, q.device) if num_splits is None else num_splits
    span = math.ceil(capacity / S)  # positions per split before rounding to whole loop steps
    if kernels.INTERPRETED:  # the interpreter's step covers a whole (short) chunk; a GPU never reads the lengths
        span = min(span, int(context_lens.max()))
    cfg = decode_launch_config(group, d, span, block_n)
    chunk = tokens_per_split(capacity, S, cfg["BLOCK_N"])  # tokens per split, whole loop steps
    qk_scale = (1.0 / math.sqrt(d) if scale is None else float(scale)) * LOG2E
    if S == 1:  # the program writes the output itself: no partials, no combine launch
        o_part, lse_part = out[:, :, None], out  # (B, H, 1, d) view of out; lse_part is not written
    else:
        o_part = torch.empty((B, H, S, d), dtype=torch.float32, device=q.device)  # (B, H, S, d) o_s
        lse_part = torch.empty((B, H, S), dtype=torch.float32, device=q.device)  # (B, H, S) λ_s
    _paged_attention_kernel[(B, H_kv, S)](
        q, k_cache, v_cache, block_tables, context_lens, o_part, lse_part,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        chunk, d, qk_scale, GROUP=group, BLOCK_SIZE=block_size, SPLIT=S > 1,
        UPCAST=kernels.INTERPRETED or q.dtype == torch.float32,
        IEEE=q.dtype == torch.float32 and not kernels.INTERPRETED, **cfg,
    )
    if S > 1:
        out, _ = combine_splits(o_part, lse_part, out_dtype=q.dtype)  # (B, H, d)
    return out


# --- the bench entry ------------------------------------------------------------------------------------------
# shape = (B, n_heads, n_kv_heads, d_head, context_len, block_size): every sequence holds context_len tokens,
# so that contiguous SDPA can run on the same data.

def paged_attention_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Ideal traffic: every cached key and value read once, q read once, out written once, block ids read once.

    The split's fp32 partials (S·(d + 1) per query head, written and read back) are left out: S·d ≪ L·d."""
    B, H, H_kv, d, L, bs = shape
    elt = torch.empty((), dtype=dtype).element_size()
    return 2 * B * L * H_kv * d * elt + 2 * B * H * d * elt + 4 * B * math.ceil(L / bs)


def paged_attention_flops(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    B, H, _, d, L, _ = shape
    return 4 * B * H * L * d  # q·k and p·v: two multiply-adds per cached value per query head


def paged_copy(k: torch.Tensor, v: torch.Tensor, block_size: int = 16, spare_blocks: int = 4,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scatter a contiguous cache k, v (B, H_kv, T, d) into a shuffled block pool, as a paging engine might.

    Returns ``(k_cache, v_cache, block_tables)``: pools (B·⌈T/bs⌉ + spare_blocks, bs, H_kv, d) whose blocks are
    handed out in random order, and (B, ⌈T/bs⌉) int32 tables; every sequence holds all T tokens.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be an integer >= 1 (16 is the usual choice)")
    if isinstance(spare_blocks, bool) or not isinstance(spare_blocks, int) or spare_blocks < 0:
        raise ValueError(f"spare_blocks={spare_blocks!r} must be an integer >= 0")
    if k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"k and v must both be (B, H_kv, T, d), got {tuple(k.shape)} and {tuple(v.shape)}")
    B, H_kv, T, d = k.shape
    n_blk = math.ceil(T / block_size)  # blocks per sequence
    pool = B * n_blk + spare_blocks
    order = torch.randperm(pool, generator=generator, device=generator.device if generator else "cpu")
    tables = order[:B * n_blk].to(k.device).view(B, n_blk).to(torch.int32)  # (B, n_blk)
    caches = []
    for dense in (k, v):
        padded = torch.zeros(B, H_kv, n_blk * block_size, d, dtype=dense.dtype, device=dense.device)
        padded[:, :, :T] = dense
        blocks = padded.view(B, H_kv, n_blk, block_size, d).permute(0, 2, 3, 1, 4)  # (B, n_blk, bs, H_kv, d)
        cache = torch.zeros(pool, block_size, H_kv, d, dtype=dense.dtype, device=dense.device)
        cache[tables.flatten().long()] = blocks.reshape(B * n_blk, block_size, H_kv, d)  # (pool, bs, H_kv, d)
        caches.append(cache)
    return caches[0], caches[1], tables


def _make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple:
    """A paged cache whose blocks are shuffled in a pool with spare blocks, plus the same KV laid out densely."""
    B, H, H_kv, d, L, bs = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, d, generator=gen, device=device).to(dtype)
    k = torch.randn(B, H_kv, L, d, generator=gen, device=device).to(dtype)  # (B, H_kv, L, d) contiguous twin
    v = torch.randn(B, H_kv, L, d, generator=gen, device=device).to(dtype)
    k_cache, v_cache, tables = paged_copy(k, v, bs, generator=gen)
    lens = torch.full((B,), L, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, tables, lens, k, v


def _kernel(q, k_cache, v_cache, tables, lens, k, v):
    return paged_attention_decode(q, k_cache, v_cache, tables, lens, check_values=False)


def _reference(q, k_cache, v_cache, tables, lens, k, v):
    return paged_attention_reference(q, k_cache, v_cache, tables, lens)


def _sdpa(q, k_cache, v_cache, tables, lens, k, v):
    return sdpa_decode(q, k, v)


def _one_split(q, k_cache, v_cache, tables, lens, k, v):
    return paged_attention_decode(q, k_cache, v_cache, tables, lens, num_splits=1, check_values=False)


BENCHMARK = Benchmark(
    name="paged_attention",
    make_inputs=_make_inputs,
    kernel=_kernel,
    reference=_reference,
    baselines={"SDPA contiguous": _sdpa, "gather+SDPA": _reference, "no split": _one_split},
    bytes_moved=paged_attention_bytes,
    flops=paged_attention_flops,
    shape_names="(B, H, H_kv, d, context, block_size)",
    # Llama-2-7B (MHA, 32 heads) and Llama-3-8B (GQA, 32/8 heads), d 128, vLLM's default block size 16
    shapes=[(8, 32, 32, 128, 1024, 16), (32, 32, 32, 128, 1024, 16), (32, 32, 8, 128, 2048, 16),
            (64, 32, 8, 128, 1024, 16), (8, 32, 8, 128, 4096, 16), (16, 32, 8, 128, 2048, 32)],
    # the last check shape is long enough for the default to split on CPU (2 splits of 304 positions)
    check_shapes=[(3, 4, 2, 32, 40, 16), (2, 4, 4, 16, 33, 8), (1, 4, 2, 32, 600, 16)],
    dtypes=(torch.bfloat16, torch.float16),
    # the kernel rounds p to 16 bits before p·v on a GPU; the reference's SDPA keeps its own rounding
    tolerance={torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)},
)
