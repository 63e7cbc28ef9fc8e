"""The Triton FlashAttention-2 forward against PyTorch's SDPA and the fp32 reference, under the interpreter.

Shapes are small and tiles large (the interpreter pays ~2.5 ms per program × loop step). Multi-tile cases
force small tiles to reach both causal stages: full tiles left of the diagonal and masked tiles on it, with
BLOCK_M > BLOCK_N as on a GPU. bf16: the interpreter may round fp32 → bf16 toward zero where a GPU rounds to
nearest, one bf16 ulp (2⁻⁷ relative), which the tolerance allows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effref import kernels
from effref.kernels.bench import check_one
from effref.kernels.flash_attention import BENCHMARK, flash_attention, flash_attention_reference

needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="Triton is not installed")


def make(B, H, H_kv, T_q, D, T_k=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T_k = T_q if T_k is None else T_k
    q = torch.randn(B, H, T_q, D, generator=gen).to(dtype)  # (B, H, T_q, D)
    k = torch.randn(B, H_kv, T_k, D, generator=gen).to(dtype)  # (B, H_kv, T_k, D)
    v = torch.randn(B, H_kv, T_k, D, generator=gen).to(dtype)
    return q, k, v


def sdpa(q, k, v, causal):
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal, **gqa)


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape, blocks", [
    ((1, 4, 2, 45, 32), (None, None)),  # odd length, GQA 2, one tile
    ((2, 2, 2, 100, 16), (None, None)),  # MHA, one 128 tile with 28 padded rows
    ((1, 3, 1, 77, 16), (32, 16)),  # MQA, several tiles: stage 1 and stage 2, BLOCK_M > BLOCK_N
    ((1, 2, 2, 33, 8), (16, 16)),  # the last tile holds one real token
], ids=["gqa45", "mha100", "mqa77-tiled", "mha33-tiled"])
def test_fp32_matches_sdpa(shape, blocks, causal):
    q, k, v = make(*shape)
    out, lse = flash_attention(q, k, v, causal=causal, block_m=blocks[0], block_n=blocks[1], return_lse=True)
    torch.testing.assert_close(out, sdpa(q, k, v, causal), atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(lse, flash_attention_reference(q, k, v, causal, return_lse=True)[1])


@needs_triton
def test_cross_attention_with_different_lengths_and_a_scale():
    q, k, v = make(1, 2, 1, 19, 16, T_k=70)
    out = flash_attention(q, k, v, scale=0.3, block_m=16, block_n=16)
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=2e-6)


@needs_triton
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)])
def test_half_precision_within_rounding_of_reference(dtype, tol):
    q, k, v = make(1, 4, 2, 45, 32, dtype=dtype)
    for causal in (False, True):
        out = flash_attention(q, k, v, causal=causal)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), flash_attention_reference(q, k, v, causal).float(), atol=tol,
                                   rtol=tol)


@needs_triton
def test_the_bench_entries_check_their_small_shapes():
    for bench in BENCHMARK:
        for shape in bench.check_shapes:
            record = check_one(bench, shape, torch.bfloat16, torch.device("cpu"))
            assert record["max_abs_err"] <= bench.tolerance[torch.bfloat16][0]


def test_bench_entries_count_causal_flops_as_half():
    plain, causal = BENCHMARK
    shape = (2, 32, 8, 4096, 128)
    assert plain.flops(shape, torch.bfloat16) == 4 * 2 * 32 * 4096 * 4096 * 128
    assert causal.flops(shape, torch.bfloat16) * 2 == plain.flops(shape, torch.bfloat16)
    assert all(s[4] == 128 and s[3] >= 2048 for s in plain.shapes)  # head dim 128, at least 2k tokens


BAD = [
    ({"k_heads": 3}, ValueError, "not a multiple of n_kv_heads=3"),
    ({"causal_cross": True}, ValueError, "causal=True needs as many queries as keys"),
    ({"block_m": 24}, ValueError, "block_m=24 must be a power of two"),
    ({"block_m": 16, "block_n": 32}, ValueError, "must be a multiple of block_n=32"),
    ({"scale": -1.0}, ValueError, "scale=-1.0"),
    ({"dtype": torch.float64}, TypeError, "float64 is not supported"),
    ({"grad": True}, RuntimeError, "no backward pass"),
]


@needs_triton
@pytest.mark.parametrize("bad, error, words", BAD, ids=[b[2][:24] for b in BAD])
def test_bad_input_is_refused(bad, error, words):
    q, k, v = make(1, 4, 2, 20, 8, T_k=30 if bad.get("causal_cross") else 20, dtype=bad.get("dtype", torch.float32))
    if "k_heads" in bad:
        k, v = k[:, :1].expand(1, 3, 20, 8), v[:, :1].expand(1, 3, 20, 8)
    if bad.get("grad"):
        q.requires_grad_(True)
    options = {name: bad[name] for name in ("block_m", "block_n", "scale") if name in bad}
    with pytest.raises(error, match=words):
        flash_attention(q, k, v, causal=bool(bad.get("causal_cross")), **options)
