"""Flash-Decoding: split one long KV sequence across many programs, then merge them by log-sum-exp.

Source: Dao, Haziza, Massa, Sizov (2023), "Flash-Decoding for long-context inference", PyTorch blog
(October 2023). The online softmax inside each split is FlashAttention's (Dao et al., 2022, arXiv:2205.14135).

The problem. At decode time a FlashAttention-style kernel gives one program to each (sequence, head) and
walks the whole cache in a loop. With batch 1 and 8 KV heads that is 8 programs on a GPU with 132 SMs:
most of the chip idles while a few programs stream 16k tokens each. Flash-Decoding adds a third grid axis:
the cache of each head is cut into S chunks, each chunk is attended by its own program (split-K), and a
second, small kernel merges the S partial answers. A chunk's program returns its normalised output o_s and
the log-sum-exp of its scores, λ_s = log Σ_{j∈s} e^{x_j} with x_j = q·k_j / √d. Because softmax weights over
the whole sequence are the chunk weights rescaled,

    λ = log Σ_s e^{λ_s},        o = Σ_s e^{λ_s − λ} o_s,

which is exact, not an approximation (computed with the max subtracted first: m = max_s λ_s,
λ = m + log Σ_s e^{λ_s − m}). An empty chunk has λ_s = −∞ and weight 0.

Layout: the contiguous cache of effref.models.llama.KVCache, k and v (B, H_kv, T, d), one decode query
q (B, H, d); query head h reads KV head h // (H / H_kv), and one program serves a KV head's whole query
group. The tile update, the end of a split (``finish_split``), the combine kernel and the split heuristic live
in kernels/_attention.py, shared with kernels/paged_attention.py, which splits a paged cache the same way.

Memory traffic: the split kernel reads the cache once (2·B·H_kv·T·d elements) and writes S·(d + 1) fp32
numbers per query head; the combine kernel reads those back and writes B·H·d outputs. With S ≪ T the extra
traffic is a rounding error, and the roofline is the time to read the cache once (``flash_decoding_bytes``).

Glossary: T cached tokens · S ``num_splits`` · chunk = tokens per split (a multiple of BLOCK_N) · o_s, λ_s
          partial output and log-sum-exp of split s · G = H / H_kv · BLOCK_N tokens per loop step.
Left out: a causal/length mask for ragged batches (every sequence here attends to all T tokens; the paged
kernel has per-sequence lengths), and the FlashDecoding++ asynchronous-max variant.
"""

from __future__ import annotations

import math

import torch

from effref import kernels
from effref.kernels._attention import (  # shared with kernels/paged_attention.py; re-exported here
    LOG2E,
    MAX_SPLITS,  # noqa: F401
    MIN_TOKENS_PER_SPLIT,  # noqa: F401
    SUPPORTED_DTYPES,
    _combine_kernel,  # noqa: F401
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


@triton.jit
def _split_kv_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,  # q (B, H, d); k, v (B, H_kv, T, d); o (B, H, S, d), lse (B, H, S) fp32
    n_kv_heads, seq_len, chunk, d_head, qk_scale,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    bh, split = tl.program_id(0), tl.program_id(1)
    b, kv_head = bh // n_kv_heads, bh % n_kv_heads
    g = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + g  # (BLOCK_G,) query heads of this KV head
    head_ok = g < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < d_head
    b64, kv64 = b.to(tl.int64), kv_head.to(tl.int64)

    # MEMORY-TRAFFIC: reads G·d query values (again in every split: S·B·H·d in all, small next to the cache).
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    first = split * chunk
    last = tl.minimum(first + chunk, seq_len)  # ≤ first when there are more splits than tiles: empty split
    k_base = k_ptr + b64 * stride_kb + kv64 * stride_kh
    v_base = v_ptr + b64 * stride_vb + kv64 * stride_vh
    for start in range(first, last, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        valid = tokens < last
        kv_mask = valid[:, None] & dim_ok[None, :]
        # MEMORY-TRAFFIC: reads BLOCK_N·d keys and values of this split: each cached value is read once.
        k = tl.load(k_base + tokens[:, None].to(tl.int64) * stride_kt + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + tokens[:, None].to(tl.int64) * stride_vt + dims[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        m_i, l_i, acc = online_softmax_step(q, k, v, valid, m_i, l_i, acc, qk_scale, IEEE)

    o, lse = finish_split(m_i, l_i, acc)  # (BLOCK_G, BLOCK_D) o_s, (BLOCK_G,) λ_s; zeros and −inf when empty
    # MEMORY-TRAFFIC: writes G·(d + 1) fp32 numbers per split.
    tl.store(o_ptr + b64 * stride_ob + heads[:, None] * stride_oh + split * stride_os + dims[None, :], o,
             mask=head_ok[:, None] & dim_ok[None, :])
    tl.store(lse_ptr + b64 * stride_lb + heads * stride_lh + split, lse, mask=head_ok)


def flash_decoding(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   num_splits: int | None = None, *, block_n: int | None = None, return_lse: bool = False,
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over a contiguous KV cache with the sequence split across programs.

    q (B, H, d), k and v (B, H_kv, T, d) with H a multiple of H_kv → (B, H, d) in q's dtype; with
    ``return_lse`` also λ (B, H) fp32, the log-sum-exp of the scaled scores. ``num_splits`` is S (default
    ``default_num_splits``: about two programs per SM, at least 256 tokens each); larger values than the
    sequence can feed leave some splits empty, which is allowed. ``block_n`` sets the tokens per loop step.
    """
    require_triton("flash_decoding")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}; convert with torch.as_tensor")
    if q.dim() != 3:
        raise ValueError(f"q.shape={tuple(q.shape)} must be (B, n_heads, d_head), one decode query per sequence")
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"k.shape={tuple(k.shape)} and v.shape={tuple(v.shape)} must be equal and "
                         "(B, n_kv_heads, T, d_head), the layout of effref.models.llama.KVCache")
    B, H, d = q.shape
    _, H_kv, T, d_kv = k.shape
    if k.shape[0] != B or d_kv != d:
        raise ValueError(f"k.shape={tuple(k.shape)} does not match q.shape={tuple(q.shape)}: batch and d_head "
                         "must agree")
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"n_heads={H} is not a multiple of n_kv_heads={H_kv}; each key/value head must serve "
                         "a whole group of query heads")
    if T == 0:
        raise ValueError("k has T=0 cached tokens; decode attention needs at least one key")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}.dtype={t.dtype} is not supported; convert with .float(), .half() or "
                            ".bfloat16()")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}; convert "
                        "q with .to(k.dtype)")
    check_same_device("q", q, k=k, v=v)
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k and v need a contiguous last (d_head) dimension; pass .contiguous() copies")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale!r} must be a positive finite number, or None for 1/sqrt(d_head)")
    check_splits_and_step(num_splits, block_n)
    if torch.is_grad_enabled() and q.requires_grad:
        raise RuntimeError("flash_decoding has no backward pass, but q requires grad; call it under "
                           "torch.no_grad(), or use flash_decoding_reference")
    check_device("q", q)

    q = q if q.stride(-1) == 1 else q.contiguous()
    S = default_num_splits(B, H_kv, T, q.device) if num_splits is None else num_splits
    group = H // H_kv
    cfg = decode_launch_config(group, d, math.ceil(T / S), block_n)
    chunk = tokens_per_split(T, S, cfg["BLOCK_N"])  # tokens per split, whole loop steps
    o_part = torch.empty((B, H, S, d), dtype=torch.float32, device=q.device)  # (B, H, S, d) o_s
    lse_part = torch.empty((B, H, S), dtype=torch.float32, device=q.device)  # (B, H, S) λ_s
    qk_scale = (1.0 / math.sqrt(d) if scale is None else float(scale)) * LOG2E
    if B and H:
        _split_kv_kernel[(B * H_kv, S)](
            q, k, v, o_part, lse_part, H_kv, T, chunk, d, qk_scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
            v.stride(2), o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0),
            lse_part.stride(1), GROUP=group, UPCAST=kernels.INTERPRETED or q.dtype == torch.float32,
            IEEE=q.dtype == torch.float32 and not kernels.INTERPRETED, **cfg,
        )
    out, lse = combine_splits(o_part, lse_part, out_dtype=q.dtype)  # (B, H, d), (B, H)
    return (out, lse) if return_lse else out


def flash_decoding_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                             return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention of one query per sequence in fp32, rounded once: q (B, H, d), k/v (B, H_kv, T, d)."""
    G = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(G, dim=1)  # (B, H, T, d): head h reads KV head h // G
    vf = v.float().repeat_interleave(G, dim=1)  # (B, H, T, d)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhd,bhtd->bht", q.float(), kf) * scale  # (B, H, T)
    out = torch.einsum("bht,bhtd->bhd", scores.softmax(dim=-1), vf).to(q.dtype)  # (B, H, d)
    return (out, scores.logsumexp(dim=-1)) if return_lse else out


# --- the bench entry ------------------------------------------------------------------------------------------
# shape = (B, n_heads, n_kv_heads, d_head, T): long contexts at small batch, where splitting matters

def flash_decoding_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Ideal traffic: the cache read once, q read once, out written once (partials are ignored: S ≪ T)."""
    B, H, H_kv, d, T = shape
    elt = torch.empty((), dtype=dtype).element_size()
    return 2 * B * H_kv * T * d * elt + 2 * B * H * d * elt


def flash_decoding_flops(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    B, H, _, d, T = shape
    return 4 * B * H * T * d


def _make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple:
    B, H, H_kv, d, T = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, d, generator=gen, device=device).to(dtype)
    k = torch.randn(B, H_kv, T, d, generator=gen, device=device).to(dtype)  # (B, H_kv, T, d)
    v = torch.randn(B, H_kv, T, d, generator=gen, device=device).to(dtype)
    return q, k, v


def _one_split(q, k, v):
    return flash_decoding(q, k, v, num_splits=1)  # the same kernel without the split: one program per KV head


BENCHMARK = Benchmark(
    name="flash_decoding",
    make_inputs=_make_inputs,
    kernel=flash_decoding,
    reference=flash_decoding_reference,
    baselines={"SDPA": sdpa_decode, "no split": _one_split},
    bytes_moved=flash_decoding_bytes,
    flops=flash_decoding_flops,
    shape_names="(B, H, H_kv, d, T)",
    # batch 1 with 16k-128k cached tokens (Llama-3-8B GQA and Llama-2-7B MHA heads), then batch 4
    shapes=[(1, 32, 8, 128, 16384), (1, 32, 8, 128, 32768), (1, 32, 8, 128, 131072), (1, 32, 32, 128, 16384),
            (4, 32, 8, 128, 16384)],
    check_shapes=[(1, 4, 2, 32, 300), (2, 4, 4, 16, 97)],
    dtypes=(torch.bfloat16, torch.float16),
    tolerance={torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)},
)
