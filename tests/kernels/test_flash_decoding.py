"""Flash-Decoding (split-KV attention + log-sum-exp combine) against PyTorch's SDPA and float64 softmax.

Split counts run from 1 to more splits than the sequence has loop steps (empty splits must drop out of the
combine with weight 0). The combine kernel is also tested on its own: partial results computed by plain
PyTorch on uneven chunks of a sequence, merged by ``combine_splits``, must give full attention, and its λ
must equal ``torch.logsumexp`` over all scores. Shapes are small for the Triton interpreter on CPU.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from effref import kernels
from effref.kernels.flash_decoding import (
    BENCHMARK,
    MAX_SPLITS,
    MIN_TOKENS_PER_SPLIT,
    combine_splits,
    default_num_splits,
    flash_decoding,
    flash_decoding_bytes,
    flash_decoding_reference,
)

needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="Triton is not installed")


def make(B: int, H: int, H_kv: int, d: int, T: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, d, generator=gen).to(dtype)
    k = torch.randn(B, H_kv, T, d, generator=gen).to(dtype)  # (B, H_kv, T, d)
    v = torch.randn(B, H_kv, T, d, generator=gen).to(dtype)
    return q, k, v


def sdpa64(q, k, v, scale=None):
    """PyTorch's own attention in float64, GQA by repeating KV heads: the peer to agree with."""
    G = q.shape[1] // k.shape[1]
    k64, v64 = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)  # (B, H, T, d)
    return F.scaled_dot_product_attention(q.double()[:, :, None], k64, v64, scale=scale)[:, :, 0]  # (B, H, d)


def scores_lse(q, k, scale=None):
    """λ = log Σ_j exp(q·k_j · scale) over all cached tokens, straight from torch.logsumexp (B, H)."""
    G = q.shape[1] // k.shape[1]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bhd,bhtd->bht", q.double(), k.double().repeat_interleave(G, 1)) * scale  # (B, H, T)
    return torch.logsumexp(s, dim=-1)


# (B, H, H_kv, d, T, num_splits, block_n): T = 50 with block_n 16 is 4 loop steps, so 8 and 64 splits leave
# most splits empty; T = 1 is the first decoding step
CASES = [
    (1, 4, 2, 32, 50, 1, 16),  # no split: the plain FlashAttention decode loop
    (1, 4, 2, 32, 50, 3, 16),  # uneven: 32 + 16 + 2 tokens
    (1, 4, 2, 32, 50, 8, 16),  # more splits than steps
    (1, 2, 2, 16, 50, 32, 16),  # MHA, far more splits than steps
    (1, 8, 1, 64, 130, 2, None),  # multi-query attention, one step per split
    (2, 2, 2, 40, 1, 4, None),  # one cached token, d_head 40 padded to 64
]


@needs_triton
@pytest.mark.parametrize("B, H, H_kv, d, T, S, block_n", CASES, ids=lambda c: str(c))
def test_fp32_equals_sdpa_for_any_split_count(B, H, H_kv, d, T, S, block_n):
    q, k, v = make(B, H, H_kv, d, T)
    out, lse = flash_decoding(q, k, v, num_splits=S, block_n=block_n, return_lse=True)
    assert out.shape == (B, H, d) and out.dtype == torch.float32 and lse.shape == (B, H)
    torch.testing.assert_close(out.double(), sdpa64(q, k, v), atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(lse.double(), scores_lse(q, k), atol=2e-5, rtol=2e-6)


@needs_triton
def test_default_split_and_scale_match_reference():
    q, k, v = make(1, 4, 2, 32, 300, seed=1)
    out = flash_decoding(q * 20, k, v, scale=0.7)  # scores in the hundreds: the running max must hold them
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), sdpa64(q * 20, k, v, scale=0.7), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, flash_decoding_reference(q * 20, k, v, scale=0.7), atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_loads(dtype, tol):
    q, k, v = make(1, 4, 2, 32, 70, dtype)
    out = flash_decoding(q, k, v, num_splits=3, block_n=16)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), sdpa64(q, k, v), atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), flash_decoding_reference(q, k, v).float(), atol=tol, rtol=tol)


@needs_triton
def test_split_count_does_not_change_the_answer():
    q, k, v = make(1, 2, 1, 16, 100, seed=2)
    outs = [flash_decoding(q, k, v, num_splits=s, block_n=8) for s in (1, 2, 5, 13, 40)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-6, rtol=1e-6)


# --- the log-sum-exp combine on its own -----------------------------------------------------------------------

@needs_triton
def test_combine_of_torch_partials_on_uneven_chunks_is_full_attention():
    q, k, v = make(2, 3, 3, 16, 37, torch.float64, seed=4)
    bounds = [0, 1, 12, 13, 37]  # chunks of 1, 11, 1 and 24 tokens
    scores = torch.einsum("bhd,bhtd->bht", q, k) / 4.0  # (B, H, T), scale 1/√16
    o_s, lse_s = [], []
    for lo, hi in itertools.pairwise(bounds):
        o_s.append(torch.einsum("bht,bhtd->bhd", scores[..., lo:hi].softmax(-1), v[:, :, lo:hi]))  # chunk softmax
        lse_s.append(torch.logsumexp(scores[..., lo:hi], dim=-1))  # (B, H)
    o_part = torch.stack(o_s, dim=2).float()  # (B, H, S, d)
    lse_part = torch.stack(lse_s, dim=2).float()  # (B, H, S)
    out, lse = combine_splits(o_part, lse_part)
    torch.testing.assert_close(out.double(), scores.softmax(-1).unsqueeze(-1).mul(v).sum(2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, dim=-1), atol=1e-5, rtol=1e-6)


@needs_triton
def test_combine_against_direct_formula_with_empty_and_extreme_splits():
    gen = torch.Generator().manual_seed(6)
    o_part = torch.randn(5, 7, 24, generator=gen)  # (R, S, d)
    lse_part = 30 * torch.randn(5, 7, generator=gen)  # (R, S): weights spanning e^±90
    lse_part[:, 2] = -math.inf  # an empty split in every row
    lse_part[3, :6] = -math.inf  # a row where only the last split holds tokens
    o_part[:, 2] = 0.0
    out, lse = combine_splits(o_part, lse_part, out_dtype=torch.float16)
    direct_lse = torch.logsumexp(lse_part.double(), dim=-1)  # (R,)
    direct = (torch.exp(lse_part.double() - direct_lse[:, None])[..., None] * o_part.double()).sum(1)  # (R, d)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), direct, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(lse.double(), direct_lse, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(out[3].double(), o_part[3, 6].double(), atol=1e-3, rtol=1e-3)


@needs_triton
def test_combine_of_a_row_with_no_tokens_is_zero_with_lse_minus_inf():
    # the paged kernel's padded batch slots (context length 0) reach the combine with every split empty
    o_part = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(7))  # (R, S, d)
    lse_part = torch.tensor([[-math.inf] * 3, [0.5, -math.inf, 1.5]])  # (R, S)
    out, lse = combine_splits(o_part, lse_part)
    assert torch.equal(out[0], torch.zeros(8)) and lse[0].item() == -math.inf
    w = torch.softmax(lse_part[1, [0, 2]].double(), dim=0)
    torch.testing.assert_close(out[1].double(), w[0] * o_part[1, 0].double() + w[1] * o_part[1, 2].double(),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("B, H_kv, T, expected", [
    (1, 1, 100, 1),  # shorter than one split's minimum: no split
    (1, 1, 10_000, 8),  # the interpreter's nominal 4 "SMs" want 8 programs
    (4, 8, 100_000, 1),  # 32 programs already fill it
])
def test_default_split_heuristic_on_cpu(B, H_kv, T, expected):
    S = default_num_splits(B, H_kv, T, torch.device("cpu"))
    assert S == expected and 1 <= S <= MAX_SPLITS
    assert S == 1 or T // S >= MIN_TOKENS_PER_SPLIT


def test_default_split_heuristic_fills_a_132_sm_gpu_at_batch_1():
    # H100 SXM: 8 KV heads alone would occupy 8 of 132 SMs; the split asks for ≈ 2 programs per SM
    S = default_num_splits(1, 8, 16384, sm_count=132)
    assert S == 33 and 8 * S >= 2 * 132
    assert default_num_splits(64, 8, 16384, sm_count=132) == 1  # 512 programs without splitting


# --- bad inputs ---------------------------------------------------------------------------------------------

def _good():
    q, k, v = make(2, 4, 2, 16, 9)
    return {"q": q, "k": k, "v": v}


BAD = [
    ("q list", {"q": [[0.0]]}, TypeError, r"q must be a torch\.Tensor"),
    ("q 2-D", {"q": torch.ones(4, 16)}, ValueError, r"q\.shape=\(4, 16\) must be \(B, n_heads, d_head\)"),
    ("k 3-D", {"k": torch.ones(2, 9, 16)}, ValueError, r"must be equal and \(B, n_kv_heads, T, d_head\)"),
    ("batch mismatch", {"q": torch.ones(3, 4, 16)}, ValueError, r"batch and d_head must agree"),
    ("heads not a multiple", {"q": torch.ones(2, 3, 16)}, ValueError,
     r"n_heads=3 is not a multiple of n_kv_heads=2"),
    ("no tokens", {"k": torch.ones(2, 2, 0, 16), "v": torch.ones(2, 2, 0, 16)}, ValueError, r"T=0 cached tokens"),
    ("int8", {"q": torch.ones(2, 4, 16, dtype=torch.int8)}, TypeError, r"q\.dtype=torch\.int8 is not supported"),
    ("mixed dtypes", {"q": torch.ones(2, 4, 16, dtype=torch.bfloat16)}, TypeError, r"must share one dtype"),
    ("k on meta", {"k": torch.ones(2, 2, 9, 16, device="meta"), "v": torch.ones(2, 2, 9, 16, device="meta")},
     ValueError, r"k is on meta but q is on cpu"),
    ("k transposed", {"k": torch.ones(2, 2, 16, 9).transpose(2, 3), "v": torch.ones(2, 2, 16, 9).transpose(2, 3)},
     ValueError, r"contiguous last \(d_head\) dimension"),
    ("zero splits", {"num_splits": 0}, ValueError, r"num_splits=0 must be an integer in \[1, 4096\]"),
    ("float splits", {"num_splits": 2.0}, ValueError, r"num_splits=2\.0 must be an integer"),
    ("negative scale", {"scale": -1.0}, ValueError, r"scale=-1\.0 must be a positive finite number"),
    ("block_n 12", {"block_n": 12}, ValueError, r"block_n=12 must be a power of two"),
    ("q needs grad", {"q": torch.ones(2, 4, 16, requires_grad=True)}, RuntimeError,
     r"flash_decoding has no backward pass"),
]


@needs_triton
@pytest.mark.parametrize("case, change, error, message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_are_refused_with_a_fix(case, change, error, message):
    with pytest.raises(error, match=message):
        flash_decoding(**(_good() | change))


@needs_triton
@pytest.mark.parametrize("o_part, lse_part, error, message", [
    (torch.ones(3, 4, 8), torch.ones(3, 5), ValueError, r"must be \(\.\.\., S, d\) and \(\.\.\., S\)"),
    (torch.ones(3, 4, 8, dtype=torch.float16), torch.ones(3, 4), TypeError, r"must be float32"),
])
def test_combine_refuses_bad_partials(o_part, lse_part, error, message):
    with pytest.raises(error, match=message):
        combine_splits(o_part, lse_part)


# --- the bench entry ----------------------------------------------------------------------------------------

def test_roofline_bytes_are_the_cache_read_once():
    shape, dtype = (1, 4, 2, 32, 300), torch.bfloat16
    q, k, v = BENCHMARK.make_inputs(shape, dtype, torch.device("cpu"))
    assert flash_decoding_bytes(shape, dtype) == k.nbytes + v.nbytes + 2 * q.nbytes  # q in, out (q-sized) out


@needs_triton
def test_kernels_compile_for_a_hopper_gpu(compile_for_gpu):
    # fp32 inputs take the IEEE tl.dot branch; the combine writes a bf16 output
    out = compile_for_gpu(
        {"module": "effref.kernels.flash_decoding", "kernel": "_split_kv_kernel", "pointer": "*fp32",
         "types": {"qk_scale": "fp32"},
         "constexprs": {"GROUP": 1, "BLOCK_G": 16, "BLOCK_N": 64, "BLOCK_D": 128, "UPCAST": True, "IEEE": True}},
        {"module": "effref.kernels.flash_decoding", "kernel": "_combine_kernel", "pointer": "*fp32",
         "types": {"out_ptr": "*bf16"}, "constexprs": {"BLOCK_S": 64, "BLOCK_D": 128}})
    assert "compiled _split_kv_kernel" in out and "compiled _combine_kernel" in out
