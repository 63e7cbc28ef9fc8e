"""The paged-attention decode kernel against brute-force softmax attention on the unpaged keys and values.

Every case builds per-sequence dense keys/values first, then scatters them into a shuffled block pool with
ragged lengths (1 token, lengths that end mid-block, lengths that fill their blocks exactly). The kernel must
agree with float64 attention over the dense originals, which never saw the block table, and with the
PyTorch reference ``effref.serving.paged_attention.paged_attention`` on the same pool. Under the Triton
interpreter on CPU the shapes are small; ``block_n`` is forced small in some cases so that the online
softmax runs over many loop steps, each straddling several cache blocks.

The sequence split (``num_splits`` > 1) cuts the table's capacity into chunks: short sequences leave their
later splits empty, and split counts beyond the tokens leave most splits empty; every split count must give
the answer of one split, which writes the output without the combine.
"""

from __future__ import annotations

import math

import pytest
import torch

import effref.kernels.paged_attention as pa
from effref import kernels
from effref.kernels.paged_attention import (
    BENCHMARK,
    default_num_splits,
    paged_attention_bytes,
    paged_attention_decode,
    paged_attention_reference,
    sdpa_decode,
)

needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="Triton is not installed")


def brute_force(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                scale: float | None = None) -> torch.Tensor:
    """float64 softmax(q kᵀ · scale) v per sequence over its dense keys (L_i, H_kv, d); returns (B, H, d)."""
    B, H, d = q.shape
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = []
    for i in range(B):
        G = H // keys[i].shape[1]
        k = keys[i].double().repeat_interleave(G, dim=1)  # (L, H, d)
        v = values[i].double().repeat_interleave(G, dim=1)  # (L, H, d)
        w = torch.einsum("hd,lhd->hl", q[i].double(), k).mul(scale).softmax(dim=-1)  # (H, L)
        out.append(torch.einsum("hl,lhd->hd", w, v))
    return torch.stack(out)  # (B, H, d)


def paged_case(lens: list[int], H: int, H_kv: int, d: int, block_size: int, dtype=torch.float32, seed: int = 0,
               spare: int = 3, fill: float = 0.0, pad_id: int = -1):
    """Dense per-sequence K/V, then the same data in a shuffled pool; unused slots and blocks hold ``fill``.

    Table entries past a sequence's last block hold ``pad_id`` (the kernel must never follow them)."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lens)
    q = torch.randn(B, H, d, generator=gen).to(dtype)
    keys = [torch.randn(n, H_kv, d, generator=gen).to(dtype) for n in lens]  # (L_i, H_kv, d)
    values = [torch.randn(n, H_kv, d, generator=gen).to(dtype) for n in lens]
    n_blocks = [math.ceil(n / block_size) for n in lens]
    pool = sum(n_blocks) + spare
    order = torch.randperm(pool, generator=gen)  # physical block ids, handed out in random order
    max_blocks = max(n_blocks) + 2  # wider than needed: trailing entries must be ignored
    tables = torch.full((B, max_blocks), pad_id, dtype=torch.int32)  # garbage past each sequence's end
    k_cache = torch.full((pool, block_size, H_kv, d), fill, dtype=dtype)
    v_cache = torch.full((pool, block_size, H_kv, d), fill, dtype=dtype)
    taken = 0
    for i, n in enumerate(lens):
        for j in range(n_blocks[i]):
            block = int(order[taken])
            taken += 1
            tables[i, j] = block
            lo, hi = j * block_size, min(n, (j + 1) * block_size)
            k_cache[block, : hi - lo] = keys[i][lo:hi]
            v_cache[block, : hi - lo] = values[i][lo:hi]
    context_lens = torch.tensor(lens, dtype=torch.int32)
    return q, k_cache, v_cache, tables, context_lens, keys, values


# (context lengths, H, H_kv, d, block_size, block_n): ragged batches with length 1, mid-block and full ends
CASES = [
    ([1, 17, 40], 4, 2, 32, 16, None),  # GQA, one step per sequence
    ([33, 5, 64, 1], 4, 4, 16, 8, 16),  # MHA, several steps, each step spans two cache blocks
    ([50, 23], 8, 2, 64, 6, 16),  # block size 6 (not a power of two), groups of 4 query heads
    ([7], 2, 1, 40, 4, 8),  # multi-query attention, d_head 40 padded to 64 in registers
]


@needs_triton
@pytest.mark.parametrize("lens, H, H_kv, d, block_size, block_n", CASES, ids=lambda c: str(c).replace(" ", ""))
def test_fp32_equals_brute_force_on_random_block_layouts(lens, H, H_kv, d, block_size, block_n):
    q, k_cache, v_cache, tables, context_lens, keys, values = paged_case(lens, H, H_kv, d, block_size)
    out = paged_attention_decode(q, k_cache, v_cache, tables, context_lens, block_n=block_n)
    assert out.shape == (len(lens), H, d) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), brute_force(q, keys, values), atol=2e-6, rtol=2e-6)
    # and the PyTorch reference of effref.serving agrees on the same pool
    torch.testing.assert_close(out, paged_attention_reference(q, k_cache, v_cache, tables, context_lens),
                               atol=2e-6, rtol=2e-6)


# (context lengths, H, H_kv, d, block_size, num_splits, block_n); tables are 2 blocks wider than needed, so the
# capacity the splits cut exceeds the longest sequence
SPLIT_CASES = [
    ([1, 17, 40, 64], 4, 2, 32, 8, 4, None),  # chunks of 32: sequences of 1 and 17 tokens leave 3 splits empty
    ([33, 5, 64, 1], 4, 4, 16, 8, 3, 8),  # MHA, several steps per split, each spanning one cache block
    ([50, 23], 8, 2, 64, 6, 5, 16),  # block size 6: split boundaries fall inside cache blocks
    ([7], 2, 1, 40, 4, 2, 8),  # multi-query attention, the second split holds nothing
    ([9, 2], 4, 2, 16, 4, 64, 8),  # far more splits than tokens: 62 of 64 splits empty for every sequence
]


@needs_triton
@pytest.mark.parametrize("lens, H, H_kv, d, block_size, S, block_n", SPLIT_CASES,
                         ids=lambda c: str(c).replace(" ", ""))
def test_split_equals_brute_force_and_one_split(lens, H, H_kv, d, block_size, S, block_n):
    q, k_cache, v_cache, tables, context_lens, keys, values = paged_case(lens, H, H_kv, d, block_size)
    out = paged_attention_decode(q, k_cache, v_cache, tables, context_lens, num_splits=S, block_n=block_n)
    assert out.shape == (len(lens), H, d) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), brute_force(q, keys, values), atol=2e-6, rtol=2e-6)
    one = paged_attention_decode(q, k_cache, v_cache, tables, context_lens, num_splits=1, block_n=block_n)
    torch.testing.assert_close(out, one, atol=1e-6, rtol=1e-6)


@needs_triton
def test_split_count_does_not_change_the_answer():
    q, k_cache, v_cache, tables, context_lens, _, _ = paged_case([45, 3, 20], 2, 1, 16, 4, seed=2)
    outs = [paged_attention_decode(q, k_cache, v_cache, tables, context_lens, num_splits=s, block_n=8)
            for s in (1, 2, 5, 13, 100)]  # the tables hold 13 blocks · 4 = 52 positions
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-6, rtol=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_split_in_half_precision_rounds_once(dtype, tol):
    # fp32 partials, then the combine writes the 16-bit output
    q, k_cache, v_cache, tables, context_lens, keys, values = paged_case([1, 37, 20], 4, 2, 32, 16, dtype)
    out = paged_attention_decode(q, k_cache, v_cache, tables, context_lens, num_splits=3, block_n=16)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), brute_force(q, keys, values), atol=tol, rtol=tol)


@needs_triton
def test_one_split_writes_the_output_without_the_combine(monkeypatch):
    q, k_cache, v_cache, tables, context_lens, keys, values = paged_case([12, 30], 4, 2, 16, 8)
    calls = []
    real = pa.combine_splits
    monkeypatch.setattr(pa, "combine_splits", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    out = paged_attention_decode(q, k_cache, v_cache, tables, context_lens, num_splits=1)
    assert calls == []
    torch.testing.assert_close(out.double(), brute_force(q, keys, values), atol=2e-6, rtol=2e-6)
    paged_attention_decode(q, k_cache, v_cache, tables, context_lens, num_splits=3)
    assert calls == [(2, 4, 3, 16)]  # (B, H, S, d) fp32 partials, merged once


@needs_triton
def test_default_splits_are_sized_from_the_table_not_the_lengths(monkeypatch):
    # the launcher may not read context_lens on a GPU (a host sync), so the default sees the table's capacity
    q, k_cache, v_cache, tables, context_lens, keys, values = paged_case([3, 5], 4, 2, 16, 4)
    seen = []
    monkeypatch.setattr(pa, "default_num_splits", lambda *a: seen.append(a) or 2)
    out = paged_attention_decode(q, k_cache, v_cache, tables, context_lens)
    assert seen == [(2, 2, tables.shape[1] * 4, q.device)]  # (batch, KV heads, capacity, device)
    torch.testing.assert_close(out.double(), brute_force(q, keys, values), atol=2e-6, rtol=2e-6)


@needs_triton
@pytest.mark.parametrize("S", [1, 3])
def test_a_sequence_with_no_tokens_gives_zeros_split_or_not(S):
    # only reachable with check_values=False (an engine's padded batch slot): zeros, never NaN, for any S
    q, k_cache, v_cache, tables, context_lens, keys, values = paged_case([6, 1], 2, 2, 16, 4)
    context_lens[1] = 0
    out = paged_attention_decode(q, k_cache, v_cache, tables, context_lens, num_splits=S, check_values=False)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[:1].double(), brute_force(q[:1], keys[:1], values[:1]), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("B, H_kv, capacity, sms, expected", [
    (8, 8, 4096, 132, 5),  # the bench's (8, 32, 8, 128, 4096, 16): 64 programs become 320 on an H100
    (1, 8, 16384, 132, 33),  # batch 1: 264 programs, two per SM
    (64, 8, 1024, 132, 1),  # 512 programs already fill the GPU: the unsplit kernel
    (8, 8, 400, 132, 1),  # under 2 × 256 positions: no split is long enough to pay for its partials
    (2, 2, 4096, 4, 2),  # the interpreter's nominal 4 "SMs"
])
def test_default_split_heuristic_values(B, H_kv, capacity, sms, expected):
    S = default_num_splits(B, H_kv, capacity, sm_count=sms)
    assert S == expected
    assert S == 1 or (B * H_kv * S >= 2 * sms and capacity // S >= 256)


@needs_triton
@pytest.mark.parametrize("S", [1, 3])
def test_never_reads_outside_a_sequences_tokens(S):
    # unused slots of the last block and all spare blocks hold NaN: a single stray read would poison the output
    q, k_cache, v_cache, tables, context_lens, keys, values = paged_case([13, 1, 30], 4, 2, 32, 8, fill=math.nan,
                                                                         pad_id=10**6)
    out = paged_attention_decode(q, k_cache, v_cache, tables, context_lens, num_splits=S, block_n=16)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), brute_force(q, keys, values), atol=2e-6, rtol=2e-6)


@needs_triton
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_loads_match_reference(dtype, tol):
    q, k_cache, v_cache, tables, context_lens, keys, values = paged_case([1, 37, 20], 4, 2, 32, 16, dtype)
    out = paged_attention_decode(q, k_cache, v_cache, tables, context_lens, block_n=16)
    assert out.dtype == dtype
    # the kernel computes in fp32 from the 16-bit loads and rounds once; brute force rounds nothing
    torch.testing.assert_close(out.double(), brute_force(q, keys, values), atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), paged_attention_reference(q, k_cache, v_cache, tables,
                                                                      context_lens).float(), atol=tol, rtol=tol)


@needs_triton
def test_scale_and_large_scores_stay_stable():
    # scores of several hundred would overflow exp without the running max
    q, k_cache, v_cache, tables, context_lens, keys, values = paged_case([25, 9], 2, 2, 16, 8, seed=3)
    out = paged_attention_decode(q * 30, k_cache, v_cache, tables, context_lens, scale=0.9, block_n=8)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), brute_force(q * 30, keys, values, scale=0.9), atol=1e-5, rtol=1e-5)


@needs_triton
def test_block_order_is_irrelevant():
    # the same tokens under two different permutations of the pool give the same answer
    q, k_cache, v_cache, tables, context_lens, _, _ = paged_case([21, 11], 4, 2, 16, 4, seed=1)
    perm = torch.randperm(k_cache.shape[0], generator=torch.Generator().manual_seed(5))  # new slot of each block
    moved_k, moved_v = torch.empty_like(k_cache), torch.empty_like(v_cache)
    moved_k[perm], moved_v[perm] = k_cache, v_cache
    moved_tables = torch.where(tables >= 0, perm[tables.clamp(min=0).long()].int(), tables)
    a = paged_attention_decode(q, k_cache, v_cache, tables, context_lens)
    b = paged_attention_decode(q, moved_k, moved_v, moved_tables, context_lens)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# --- bad inputs ---------------------------------------------------------------------------------------------

def _good():
    q, k_cache, v_cache, tables, lens, _, _ = paged_case([5, 9], 4, 2, 16, 4)
    return {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_tables": tables, "context_lens": lens}


BAD = [
    ("q list", {"q": [[0.0]]}, TypeError, r"q must be a torch\.Tensor"),
    ("q 4-D", {"q": torch.ones(2, 4, 1, 16)}, ValueError, r"q\.shape=\(2, 4, 1, 16\) must be \(B, n_heads"),
    ("caches differ", {"v_cache": torch.ones(6, 4, 2, 8)}, ValueError, r"must be equal and \(num_blocks"),
    ("d_head mismatch", {"q": torch.ones(2, 4, 8)}, ValueError, r"k_cache has d_head=16 but q has d_head=8"),
    ("heads not a multiple", {"q": torch.ones(2, 3, 16)}, ValueError,
     r"n_heads=3 is not a multiple of n_kv_heads=2"),
    ("float64", {"q": torch.ones(2, 4, 16, dtype=torch.float64)}, TypeError,
     r"q\.dtype=torch\.float64 is not supported"),
    ("mixed dtypes", {"q": torch.ones(2, 4, 16, dtype=torch.float16)}, TypeError,
     r"must share one dtype.*\.to\(k_cache\.dtype\)"),
    ("float tables", {"block_tables": torch.zeros(2, 5)}, TypeError,
     r"block_tables\.dtype=torch\.float32 must be an integer type"),
    ("table rows", {"block_tables": torch.zeros(3, 5, dtype=torch.int32)}, ValueError,
     r"block_tables\.shape=\(3, 5\) must be \(B, max_blocks\) with B=2"),
    ("lens shape", {"context_lens": torch.ones(3, dtype=torch.int32)}, ValueError,
     r"context_lens\.shape=\(3,\) must be \(B,\) = \(2,\)"),
    ("empty context", {"context_lens": torch.tensor([0, 3], dtype=torch.int32)}, ValueError,
     r"context_lens must lie in \[1, max_blocks \* block_size = 20\], got min 0"),
    ("context too long", {"context_lens": torch.tensor([21, 3], dtype=torch.int32)}, ValueError,
     r"got min 3, max 21; drop empty sequences from the batch, or widen block_tables"),
    ("block id too large", {"block_tables": torch.tensor([[0, 99, -1, -1, -1], [2, 3, 4, 5, 6]], dtype=torch.int32)},
     ValueError, r"block_tables holds block id 99 outside \[0, num_blocks=8\)"),
    ("negative block id", {"block_tables": torch.tensor([[0, 1, -1, -1, -1], [2, -1, 4, 5, 6]], dtype=torch.int32)},
     ValueError, r"block id -1 outside"),
    ("cache on meta", {"k_cache": torch.ones(7, 4, 2, 16, device="meta"),
                           "v_cache": torch.ones(7, 4, 2, 16, device="meta")}, ValueError,
     r"k_cache is on meta but q is on cpu"),
    ("cache d not contiguous", {"k_cache": torch.ones(7, 4, 16, 2).transpose(2, 3),
                                    "v_cache": torch.ones(7, 4, 16, 2).transpose(2, 3)}, ValueError,
     r"contiguous last \(d_head\) dimension"),
    ("scale zero", {"scale": 0.0}, ValueError, r"scale=0\.0 must be a positive finite number"),
    ("block_n not power of 2", {"block_n": 24}, ValueError, r"block_n=24 must be a power of two"),
    ("zero splits", {"num_splits": 0}, ValueError,
     r"num_splits=0 must be an integer in \[1, 4096\], or None for default_num_splits"),
    ("float splits", {"num_splits": 2.0}, ValueError, r"num_splits=2\.0 must be an integer"),
    ("bool splits", {"num_splits": True}, ValueError, r"num_splits=True must be an integer"),
    ("too many splits", {"num_splits": 5000}, ValueError, r"num_splits=5000 must be an integer in \[1, 4096\]"),
    ("q needs grad", {"q": torch.ones(2, 4, 16, requires_grad=True)}, RuntimeError,
     r"paged_attention_decode has no backward pass"),
]


@needs_triton
@pytest.mark.parametrize("case, change, error, message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_are_refused_with_a_fix(case, change, error, message):
    args = _good() | change
    with pytest.raises(error, match=message):
        paged_attention_decode(**args)


@needs_triton
def test_cpu_tensor_refused_when_compiling_for_gpu(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    with pytest.raises(ValueError, match=r"q is on cpu, but Triton compiles for the GPU"):
        paged_attention_decode(**_good())


# --- the bench entry ----------------------------------------------------------------------------------------

def test_bench_inputs_hold_the_same_keys_paged_and_contiguous():
    # the SDPA baseline reads the contiguous twin; it must be the same data as the paged pool
    inputs = BENCHMARK.make_inputs((3, 4, 2, 16, 21, 8), torch.float32, torch.device("cpu"))
    torch.testing.assert_close(sdpa_decode(*inputs[0:1], *inputs[5:7]), BENCHMARK.reference(*inputs),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape, dtype", [((3, 4, 2, 16, 21, 8), torch.bfloat16), ((2, 8, 8, 32, 64, 16),
                                                                                   torch.float32)])
def test_roofline_bytes_are_the_cache_read_once(shape, dtype):
    q, _k_cache, _v_cache, _tables, _lens, k, v = BENCHMARK.make_inputs(shape, dtype, torch.device("cpu"))
    B, _, _, _, L, bs = shape
    # every key and value of every sequence once, q in, out (q-sized) out, one int32 block id per used block
    assert paged_attention_bytes(shape, dtype) == k.nbytes + v.nbytes + 2 * q.nbytes + 4 * B * math.ceil(L / bs)


@needs_triton
def test_kernel_compiles_for_a_hopper_gpu(compile_for_gpu):
    # the launcher's GPU configuration (16-row query tiles for tl.dot, bf16 loads), unsplit (bf16 output written
    # directly) and split (fp32 partials o_s and λ_s); the fp32/IEEE branch of the shared online_softmax_step
    # and the combine kernel are compiled by test_flash_decoding.py
    job = {"module": "effref.kernels.paged_attention", "kernel": "_paged_attention_kernel",
           "types": {"bt_ptr": "*i32", "len_ptr": "*i32", "qk_scale": "fp32"},
           "constexprs": {"GROUP": 4, "BLOCK_SIZE": 16, "BLOCK_G": 16, "BLOCK_N": 64, "BLOCK_D": 128,
                          "SPLIT": False, "UPCAST": False, "IEEE": False}}
    split = job | {"types": job["types"] | {"o_ptr": "*fp32", "lse_ptr": "*fp32"},
                   "constexprs": job["constexprs"] | {"SPLIT": True}}
    out = compile_for_gpu(job, split)
    assert out.count("compiled _paged_attention_kernel") == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"block_size": 0}, "block_size=0 must be an integer >= 1"),  # was a ZeroDivisionError
    ({"block_size": 2.5}, "block_size=2.5 must be an integer >= 1"),
    ({"spare_blocks": -1}, "spare_blocks=-1 must be an integer >= 0"),
])
def test_paged_copy_refuses_bad_arguments(kwargs, message):
    from effref.kernels.paged_attention import paged_copy

    k = torch.zeros(1, 2, 5, 4)
    with pytest.raises(ValueError, match=message):
        paged_copy(k, k, **kwargs)
