"""FlashAttention-2 forward as a Triton kernel: exact attention that never writes the T × T scores to memory.

Papers: Dao, Fu, Ermon, Rudra, Ré (2022), arXiv:2205.14135, Algorithm 1; Dao (2023), "FlashAttention-2:
Faster Attention with Better Parallelism and Work Partitioning", arXiv:2307.08691, Algorithm 1 and §3.
One program owns a tile of BLOCK_M queries of one (sequence, head), keeps them in registers, and walks the
key/value tiles of BLOCK_N tokens with the online softmax (running max m, running sum ℓ, unnormalised
output acc; the update is written out in effref/attention/flash.py):

    m' = max(m, rowmax S),   ℓ' = ℓ·e^{m − m'} + rowsum e^{S − m'},   acc' = acc·e^{m − m'} + e^{S − m'} V,

and divides by ℓ once at the end (FlashAttention-2's change from the first paper, which rescaled the output
in memory after every tile). Parallel over (query tiles, batch · heads), also FlashAttention-2's change.

Causal masking (FlashAttention-2 §3.1). Key tiles entirely left of the query tile are seen in full, so
they need only the sequence-length mask of the keys: those go through ``online_softmax_step`` of
kernels/_attention.py, the same tile update the paged and Flash-Decoding kernels use. Tiles on the diagonal
need a per-(query, key) mask, which that step cannot take (its mask is one vector over keys: a decode query
sees the same keys in every row); ``_diagonal_step`` is the same update with a 2-D mask. Tiles right of the
diagonal are skipped: about half the work of a causal pass. GQA: query head h reads key/value head
h // (H / H_kv). Odd lengths: the last tiles are masked. Causal attention needs T_q = T_k (self-attention).

Memory traffic: Q read once and O written once (B·H·T_q·D each); K and V read once per query tile,
2·B·H·⌈T_q/BLOCK_M⌉·T_k·D (halved when causal), served largely from L2; log-sum-exp L written (B·H·T_q fp32).
FLOPs: 4·B·H·T_q·T_k·D (two matmuls), half of it when causal.
Glossary: BLOCK_M queries per program (B_r) · BLOCK_N keys per step (B_c) · m, ℓ, acc as above · G = H / H_kv.
Left out: the backward pass (call this under torch.no_grad(); effref.attention.flash_attention_tiled trains),
dropout, variable-length batches, and autotuning (one untuned GPU configuration per head size).
"""

from __future__ import annotations

import math

import torch

from effref import kernels
from effref.kernels._attention import LOG2E, SUPPORTED_DTYPES, online_softmax_step
from effref.kernels._runtime import (
    Benchmark,
    check_device,
    check_same_device,
    next_power_of_2,
    require_triton,
    tl,
    triton,
)


@triton.jit
def _diagonal_step(q, k, v, visible, m_i, l_i, acc, qk_scale, IEEE: tl.constexpr):
    """``online_softmax_step`` with a 2-D mask ``visible`` (BLOCK_M, BLOCK_N): key j ≤ query i, j < T_k.

    A row may be fully masked in a tile here; its max was already finite (the diagonal tile's first key is
    visible to every row), so its α = 1 and p = 0.
    """
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BLOCK_M, BLOCK_N)
    else:
        s = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N) fp32 accumulation
    s = tl.where(visible, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # (BLOCK_M,)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _flash_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,  # q, o (B, H, T_q, D); k, v (B, H_kv, T_k, D); lse (B, H, T_q) fp32
    n_heads, q_len, k_len, d_head, qk_scale,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    tile, bh = tl.program_id(0), tl.program_id(1)
    b, head = bh // n_heads, bh % n_heads
    kv_head = head // GROUP  # GQA: G query heads share one key/value head
    b64, h64, kv64 = b.to(tl.int64), head.to(tl.int64), kv_head.to(tl.int64)
    first_row = tile * BLOCK_M
    rows = first_row + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query positions
    dims = tl.arange(0, BLOCK_D)
    row_ok, dim_ok = rows < q_len, dims < d_head

    # MEMORY-TRAFFIC: reads BLOCK_M·D queries, once; they stay in registers for the whole loop.
    q = tl.load(q_ptr + b64 * stride_qb + h64 * stride_qh + rows[:, None].to(tl.int64) * stride_qt + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    k_base = k_ptr + b64 * stride_kb + kv64 * stride_kh
    v_base = v_ptr + b64 * stride_vb + kv64 * stride_vh

    # Stage 1: key tiles every query of the tile sees in full (all of them when not causal).
    full_end = first_row if CAUSAL else k_len
    for start in range(0, full_end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        key_ok = keys < k_len
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        # MEMORY-TRAFFIC: reads BLOCK_N·D keys and values per step.
        k = tl.load(k_base + keys[:, None].to(tl.int64) * stride_kt + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + keys[:, None].to(tl.int64) * stride_vt + dims[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        m_i, l_i, acc = online_softmax_step(q, k, v, key_ok, m_i, l_i, acc, qk_scale, IEEE)

    # Stage 2 (causal): the tiles on the diagonal, masked key j ≤ query i; tiles past it are never read.
    if CAUSAL:
        for start in range(first_row, tl.minimum(first_row + BLOCK_M, k_len), BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            key_ok = keys < k_len
            kv_mask = key_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_base + keys[:, None].to(tl.int64) * stride_kt + dims[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + keys[:, None].to(tl.int64) * stride_vt + dims[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k, v = k.to(tl.float32), v.to(tl.float32)
            visible = (keys[None, :] <= rows[:, None]) & key_ok[None, :]  # (BLOCK_M, BLOCK_N)
            m_i, l_i, acc = _diagonal_step(q, k, v, visible, m_i, l_i, acc, qk_scale, IEEE)

    out = acc / l_i[:, None]  # (BLOCK_M, BLOCK_D): FlashAttention-2 divides once, at the end
    # MEMORY-TRAFFIC: writes BLOCK_M·D outputs and BLOCK_M fp32 log-sum-exps.
    tl.store(o_ptr + b64 * stride_ob + h64 * stride_oh + rows[:, None].to(tl.int64) * stride_ot + dims[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    lse = m_i * 0.6931471805599453 + tl.log(l_i)  # (BLOCK_M,) m is in base 2: L = m·ln 2 + ln ℓ
    tl.store(lse_ptr + bh.to(tl.int64) * q_len + rows, lse, mask=row_ok)


def _launch_config(q_len: int, k_len: int, d_head: int, block_m: int | None, block_n: int | None) -> dict:
    """The interpreter pays per program × loop step: one or two big tiles. A GPU: untuned tiles of 128 queries
    × 64 keys. ``block_m``/``block_n`` override; BLOCK_M must be a multiple of BLOCK_N (the causal stages
    start the diagonal at a whole key tile)."""
    block_d = max(16, next_power_of_2(d_head))
    if kernels.INTERPRETED:
        block = min(128, max(16, next_power_of_2(max(q_len, k_len))))
        cfg = {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_D": block_d, "num_warps": 4}
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": block_d, "num_warps": 8 if block_d >= 128 else 4,
               "num_stages": 3}
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1
                                  or value & (value - 1) or (not kernels.INTERPRETED and value < 16)):
            raise ValueError(f"{name}={value!r} must be a power of two (≥ 16 on a GPU), or None for the default")
    cfg["BLOCK_M"] = block_m or cfg["BLOCK_M"]
    cfg["BLOCK_N"] = block_n or cfg["BLOCK_N"]
    if cfg["BLOCK_M"] % cfg["BLOCK_N"]:
        raise ValueError(f"block_m={cfg['BLOCK_M']} must be a multiple of block_n={cfg['BLOCK_N']}")
    return cfg


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: float | None = None, return_lse: bool = False, *, block_m: int | None = None,
                    block_n: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention, FlashAttention-2 forward: q (B, H, T_q, D), k and v (B, H_kv, T_k, D) → (B, H, T_q, D).

    H must be a multiple of H_kv (GQA); any lengths; ``causal`` needs T_q = T_k. With ``return_lse`` also the
    log-sum-exp of the scaled scores per query, (B, H, T_q) fp32. ``block_m``, ``block_n`` override the tile
    (queries per program, keys per loop step). Forward only.
    """
    require_triton("flash_attention")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}; convert with torch.as_tensor")
        if t.dim() != 4:
            raise ValueError(f"{name}.shape={tuple(t.shape)} must be (B, heads, T, D)")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}.dtype={t.dtype} is not supported; convert with .float(), .half() or "
                            ".bfloat16()")
    if k.shape != v.shape:
        raise ValueError(f"k.shape={tuple(k.shape)} and v.shape={tuple(v.shape)} must be equal")
    B, H, T_q, D = q.shape
    _, H_kv, T_k, _ = k.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k.shape={tuple(k.shape)} does not match q.shape={tuple(q.shape)}: batch and head "
                         "dimension must agree")
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"n_heads={H} is not a multiple of n_kv_heads={H_kv}; each key/value head must serve "
                         "a whole group of query heads")
    if D > 256:
        raise ValueError(f"head dimension D={D} exceeds 256, the widest tile this kernel keeps in registers")
    if not isinstance(causal, bool):
        raise TypeError(f"causal={causal!r} must be True or False")
    if causal and T_q != T_k:
        raise ValueError(f"causal=True needs as many queries as keys, got T_q={T_q} and T_k={T_k}")
    if T_k == 0:
        raise ValueError("k has T_k=0 tokens; attention needs at least one key")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    check_same_device("q", q, k=k, v=v)
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale!r} must be a positive finite number, or None for 1/sqrt(D)")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError("flash_attention has no backward pass, but an input requires grad; call it under "
                           "torch.no_grad(), or train with effref.attention.flash_attention_tiled")
    cfg = _launch_config(T_q, T_k, D, block_m, block_n)
    check_device("q", q)

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # (B, H, T_q, D)
    lse = torch.empty((B, H, T_q), dtype=torch.float32, device=q.device)  # (B, H, T_q)
    qk_scale = (1.0 / math.sqrt(D) if scale is None else float(scale)) * LOG2E
    if B and H and T_q:
        grid = (triton.cdiv(T_q, cfg["BLOCK_M"]), B * H)
        _flash_fwd_kernel[grid](
            q, k, v, out, lse, H, T_q, T_k, D, qk_scale,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            GROUP=H // H_kv, CAUSAL=causal, UPCAST=kernels.INTERPRETED or q.dtype == torch.float32,
            IEEE=q.dtype == torch.float32 and not kernels.INTERPRETED, **cfg,
        )
    return (out, lse) if return_lse else out


def flash_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                              scale: float | None = None, return_lse: bool = False,
                              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in fp32 with the full score matrix, rounded once to q's dtype (the kernel's oracle)."""
    G = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(G, dim=1), v.float().repeat_interleave(G, dim=1)  # (B, H, T_k, D)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q.float() @ kf.transpose(-1, -2) * scale  # (B, H, T_q, T_k)
    if causal:
        scores = scores.masked_fill(~torch.ones_like(scores, dtype=torch.bool).tril(), float("-inf"))
    out = (scores.softmax(dim=-1) @ vf).to(q.dtype)  # (B, H, T_q, D)
    return (out, scores.logsumexp(dim=-1)) if return_lse else out


# --- the bench entries ----------------------------------------------------------------------------------------
# shape = (B, H, H_kv, T, D): prefill of T tokens, T_q = T_k = T

def flash_attention_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Ideal traffic: Q, K, V read once, O written once (the tiles' re-reads of K, V are L2 hits at best)."""
    B, H, H_kv, T, D = shape
    elt = torch.empty((), dtype=dtype).element_size()
    return (2 * B * H * T * D + 2 * B * H_kv * T * D) * elt


def flash_attention_flops(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    B, H, _, T, D = shape
    return 4 * B * H * T * T * D


def _make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple:
    B, H, H_kv, T, D = shape
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, T, D, generator=gen, device=device).to(dtype)  # (B, H, T, D)
    k = torch.randn(B, H_kv, T, D, generator=gen, device=device).to(dtype)  # (B, H_kv, T, D)
    v = torch.randn(B, H_kv, T, D, generator=gen, device=device).to(dtype)
    return q, k, v


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """PyTorch's fused attention (its flash backend for 16-bit inputs on recent GPUs)."""
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)


def _causal(fn):
    def call(q, k, v):
        return fn(q, k, v, causal=True)
    return call


_COMMON = {
    "make_inputs": _make_inputs, "bytes_moved": flash_attention_bytes, "shape_names": "(B, H, H_kv, T, D)",
    # head dim 128 at 2k-16k tokens: Llama-2-7B-like MHA (32 heads) and Llama-3-8B-like GQA (32 / 8)
    "shapes": [(4, 32, 32, 2048, 128), (2, 32, 32, 4096, 128), (1, 32, 32, 8192, 128), (2, 32, 8, 4096, 128),
            (1, 32, 8, 16384, 128)],
    "check_shapes": [(1, 4, 2, 45, 32), (2, 2, 2, 100, 16)],
    "dtypes": (torch.bfloat16, torch.float16),
    "tolerance": {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)},
}
BENCHMARK = [
    Benchmark(name="flash_attention", kernel=flash_attention, reference=flash_attention_reference,
              baselines={"SDPA": _sdpa}, flops=flash_attention_flops, **_COMMON),
    Benchmark(name="flash_attention_causal", kernel=_causal(flash_attention),
              reference=_causal(flash_attention_reference), baselines={"SDPA": _causal(_sdpa)},
              flops=lambda shape, dtype: flash_attention_flops(shape, dtype) // 2, **_COMMON),
]
