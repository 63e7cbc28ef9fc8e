"""Pieces shared by the decode-attention kernels (kernels/paged_attention.py, kernels/flash_decoding.py).

Both kernels score one decode query per sequence against a long KV cache, fold each tile of keys into
FlashAttention's running softmax (Dao et al., 2022, arXiv:2205.14135, Algorithm 1), and may cut the cache of
one (sequence, KV head) into S chunks that separate programs attend to (Flash-Decoding's split-KV). This module
holds what they share, so there is one of each:

- ``online_softmax_step``: the tile update  m' = max(m, max_j s_j),  ℓ' = ℓ·e^{m − m'} + Σ_j e^{s_j − m'},
  acc' = acc·e^{m − m'} + Σ_j e^{s_j − m'} v_j  (scores in base 2, see LOG2E);
- ``finish_split``: the end of a program's loop, o_s = acc / ℓ and λ_s = log Σ_j e^{x_j} (natural log);
- ``combine_splits`` and ``_combine_kernel``: o = Σ_s e^{λ_s − λ} o_s with λ = log Σ_s e^{λ_s}, exact;
- ``default_num_splits``: how many splits fill a GPU; ``tokens_per_split``: a split's chunk in whole loop steps;
- ``decode_launch_config``, the argument checks of ``num_splits`` and ``block_n``, and ``sdpa_decode``, the
  contiguous PyTorch baseline both bench entries compare against.

The leading underscore keeps ``python -m effref.kernels.bench`` from looking for a BENCHMARK entry here.
Glossary: S splits · chunk = tokens per split · o_s, λ_s partial output and log-sum-exp of split s
          · m running max, ℓ running sum, acc running Σ p·v (fp32) · G query heads per KV head.
"""

from __future__ import annotations

import math

import torch

from effref import kernels
from effref.kernels._runtime import check_device, cuda_sm_count, next_power_of_2, require_triton, tl, triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634  # scores are kept in base 2: e^x = 2^(x·log2 e), and exp2 is the cheaper op
MIN_TOKENS_PER_SPLIT = 256  # below this a split's loop is too short to pay for its partial write
MAX_SPLITS = 128  # the default never asks for more; callers may pass up to MAX_NUM_SPLITS
MAX_NUM_SPLITS = 4096


@triton.jit
def online_softmax_step(q, k, v, valid, m_i, l_i, acc, qk_scale, IEEE: tl.constexpr):
    """Fold one tile of keys/values into the running softmax of BLOCK_G query heads (FlashAttention's update).

    q (BLOCK_G, BLOCK_D), k and v (BLOCK_N, BLOCK_D), valid (BLOCK_N,) marks real tokens; m_i, l_i (BLOCK_G,)
    and acc (BLOCK_G, BLOCK_D) are fp32. ``qk_scale`` = scale · log2 e, so the exponentials are exp2.
    """
    if IEEE:  # fp32 inputs on a GPU: no TF32 rounding
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BLOCK_G, BLOCK_N)
    else:
        s = tl.dot(q, tl.trans(k))  # (BLOCK_G, BLOCK_N), fp32 accumulation
    s = tl.where(valid[None, :], s * qk_scale, float("-inf"))  # log2-scaled scores; padding never wins
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # (BLOCK_G,) finite: every tile holds a valid token
    alpha = tl.exp2(m_i - m_new)  # (BLOCK_G,) rescales what was summed under the old max (0 on the first tile)
    p = tl.exp2(s - m_new[:, None])  # (BLOCK_G, BLOCK_N)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")  # (BLOCK_G, BLOCK_D)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # 16-bit p on tensor cores, as in FlashAttention
    return m_new, l_i, acc


@triton.jit
def finish_split(m_i, l_i, acc):
    """After a program's last tile: o_s = acc / ℓ (BLOCK_G, BLOCK_D) and λ_s = m·ln 2 + ln ℓ (BLOCK_G,).

    A program that saw no token (ℓ = 0: an empty split) returns zeros and λ_s = −inf, weight 0 in the combine.
    """
    nonempty = l_i > 0
    safe_l = tl.where(nonempty, l_i, 1.0)
    o = acc / safe_l[:, None]  # (BLOCK_G, BLOCK_D)
    lse = tl.where(nonempty, m_i * 0.6931471805599453 + tl.log(safe_l), float("-inf"))  # (BLOCK_G,) ln 2 · m + ln ℓ
    return o, lse


@triton.jit
def _combine_kernel(
    o_part_ptr, lse_part_ptr, out_ptr, lse_ptr,  # o_part (R, S, d), lse_part (R, S) fp32; out (R, d); lse (R,)
    n_splits, d_head, stride_pr, stride_ps, stride_lr, stride_or,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # one (sequence, query head)
    s = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    s_ok, dim_ok = s < n_splits, dims < d_head
    # MEMORY-TRAFFIC: reads S log-sum-exps and S·d partial outputs (fp32) of this row.
    lse_s = tl.load(lse_part_ptr + row * stride_lr + s, mask=s_ok, other=float("-inf"))  # (BLOCK_S,) λ_s
    o_s = tl.load(o_part_ptr + row * stride_pr + s[:, None] * stride_ps + dims[None, :],
                  mask=s_ok[:, None] & dim_ok[None, :], other=0.0)  # (BLOCK_S, BLOCK_D)
    m = tl.max(lse_s, axis=0)  # −inf only for a row whose every split is empty
    m_safe = tl.where(m > float("-inf"), m, 0.0)
    w = tl.exp(lse_s - m_safe)  # (BLOCK_S,) e^{λ_s − m}; 0 for empty and padding splits
    total = tl.sum(w, axis=0)
    safe_total = tl.where(total > 0, total, 1.0)
    out = tl.sum(w[:, None] * o_s, axis=0) / safe_total  # (BLOCK_D,) o = Σ_s e^{λ_s − λ} o_s
    lse = tl.where(total > 0, m_safe + tl.log(safe_total), float("-inf"))  # λ = m + log Σ_s e^{λ_s − m}
    # MEMORY-TRAFFIC: writes d outputs in the output dtype and one fp32 λ.
    tl.store(out_ptr + row * stride_or + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)
    tl.store(lse_ptr + row, lse)


def combine_splits(o_part: torch.Tensor, lse_part: torch.Tensor, out_dtype: torch.dtype | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge S partial attention results: o_part (..., S, d), lse_part (..., S) → (o (..., d), λ (...)).

    ``o = Σ_s exp(λ_s − λ) o_s`` with ``λ = logsumexp_s λ_s``, in a Triton kernel, one program per row.
    Splits with λ_s = −inf (no tokens) get weight 0; a row with no tokens at all gets o = 0 and λ = −inf.
    """
    require_triton("combine_splits")
    if not isinstance(o_part, torch.Tensor) or not isinstance(lse_part, torch.Tensor):
        raise TypeError("o_part and lse_part must be torch.Tensor")
    if o_part.dim() < 2 or tuple(lse_part.shape) != tuple(o_part.shape[:-1]):
        raise ValueError(f"o_part.shape={tuple(o_part.shape)} and lse_part.shape={tuple(lse_part.shape)} must "
                         "be (..., S, d) and (..., S)")
    if o_part.dtype != torch.float32 or lse_part.dtype != torch.float32:
        raise TypeError(f"o_part and lse_part must be float32 (the split kernel's accumulators), got "
                        f"{o_part.dtype} and {lse_part.dtype}; convert with .float()")
    if lse_part.device != o_part.device:
        raise ValueError(f"lse_part is on {lse_part.device} but o_part is on {o_part.device}")
    check_device("o_part", o_part)
    *lead, S, d = o_part.shape
    rows = math.prod(lead)
    o2 = o_part.reshape(rows, S, d).contiguous()  # (R, S, d)
    l2 = lse_part.reshape(rows, S).contiguous()  # (R, S)
    out = torch.empty((rows, d), dtype=out_dtype or torch.float32, device=o_part.device)  # (R, d)
    lse = torch.empty((rows,), dtype=torch.float32, device=o_part.device)  # (R,)
    if rows and S and d:
        _combine_kernel[(rows,)](o2, l2, out, lse, S, d, o2.stride(0), o2.stride(1), l2.stride(0), out.stride(0),
                                 BLOCK_S=next_power_of_2(S), BLOCK_D=next_power_of_2(d), num_warps=4)
    return out.reshape(*lead, d), lse.reshape(lead)


def default_num_splits(batch: int, n_kv_heads: int, seq_len: int, device: torch.device | None = None,
                       sm_count: int | None = None) -> int:
    """Enough programs to fill the GPU (≈ 2 per SM), but no split shorter than MIN_TOKENS_PER_SPLIT tokens.

    ``seq_len`` is the span the splits cut: the cached tokens of a contiguous cache, the block-table capacity
    of a paged one. The SM count comes from ``device`` (a CUDA device), or ``sm_count`` to ask about another
    GPU; on CPU it is 4.
    """
    if sm_count is not None:
        sms = sm_count
    elif device is not None and device.type == "cuda":
        sms = cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        sms = 4  # the interpreter: a few programs are cheapest; the heuristic's shape stays the same
    want = math.ceil(2 * sms / max(1, batch * n_kv_heads))  # splits needed to fill the machine
    most = max(1, seq_len // MIN_TOKENS_PER_SPLIT)  # splits the sequence can feed
    return max(1, min(want, most, MAX_SPLITS))


def tokens_per_split(span: int, num_splits: int, block_n: int) -> int:
    """The chunk of each split: ⌈span / S⌉ rounded up to whole loop steps of ``block_n`` tokens."""
    return math.ceil(math.ceil(span / num_splits) / block_n) * block_n


def decode_launch_config(group: int, d_head: int, span: int, block_n: int | None) -> dict:
    """Tile sizes: the interpreter pays per program × loop step (one step per ``span`` tokens, up to 1024); a
    GPU wants tl.dot dimensions ≥ 16. ``block_n`` overrides the tokens per loop step."""
    if kernels.INTERPRETED:
        cfg = {"BLOCK_G": next_power_of_2(group), "BLOCK_D": next_power_of_2(d_head),
               "BLOCK_N": min(1024, max(16, next_power_of_2(span))), "num_warps": 4}
    else:  # untuned defaults: 64 tokens of 128 dims per step is 16 KiB of bf16 keys in flight
        cfg = {"BLOCK_G": max(16, next_power_of_2(group)), "BLOCK_D": max(16, next_power_of_2(d_head)),
               "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    if block_n is not None:
        cfg["BLOCK_N"] = block_n
    return cfg


def check_splits_and_step(num_splits: int | None, block_n: int | None) -> None:
    """The launchers' checks of ``num_splits`` (S) and ``block_n`` (tokens per loop step)."""
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or not 1 <= num_splits <= MAX_NUM_SPLITS):
        raise ValueError(f"num_splits={num_splits!r} must be an integer in [1, {MAX_NUM_SPLITS}], or None for "
                         "default_num_splits")
    if block_n is not None and (isinstance(block_n, bool) or not isinstance(block_n, int) or block_n < 1
                                or block_n & (block_n - 1) or (not kernels.INTERPRETED and block_n < 16)):
        raise ValueError(f"block_n={block_n!r} must be a power of two (≥ 16 on a GPU), or None for the default")


def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Contiguous decode attention with PyTorch's fused SDPA: q (B, H, d), k/v (B, H_kv, L, d) → (B, H, d)."""
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    out = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, **gqa)
    return out[:, :, 0]  # (B, H, d)
