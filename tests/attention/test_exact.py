"""Exact methods against PyTorch's own scaled_dot_product_attention; the shared checks; the swap into Llama."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from effref.attention import (
    bigbird_attention,
    flash_attention_tiled,
    linear_attention,
    linformer_attention,
    linformer_projection,
    longformer_attention,
    nystrom_attention,
    performer_attention,
    reformer_attention,
    softmax_attention,
    sparse_transformer_attention,
    use_attention,
)
from effref.models.llama import Llama, LlamaConfig


def qkv(B=2, H=4, H_kv=4, T=37, D=16, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=gen, dtype=dtype)  # (B, H, T, D)
    k = torch.randn(B, H_kv, T, D, generator=gen, dtype=dtype)  # (B, H_kv, T, D)
    v = torch.randn(B, H_kv, T, D, generator=gen, dtype=dtype)
    return q, k, v


def sdpa(q, k, v, causal):
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H_kv", [4, 2, 1])
def test_softmax_attention_equals_sdpa(causal, H_kv):
    q, k, v = qkv(H_kv=H_kv)
    torch.testing.assert_close(softmax_attention(q, k, v, causal=causal), sdpa(q, k, v, causal))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("blocks", [(16, 16), (16, 8), (8, 32), (64, 64)])
def test_flash_tiled_equals_sdpa_for_odd_lengths_and_gqa(causal, blocks):
    q, k, v = qkv(H_kv=2, T=37)
    out, lse = flash_attention_tiled(q, k, v, causal=causal, block_q=blocks[0], block_k=blocks[1], return_lse=True)
    torch.testing.assert_close(out, sdpa(q, k, v, causal), atol=1e-5, rtol=1e-5)
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) / 4  # (B, H, T, T), D = 16
    if causal:
        scores = scores.masked_fill(~torch.ones(37, 37, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), atol=1e-5, rtol=1e-5)


def test_flash_tiled_cross_attention_and_gradient():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 5, 8, generator=gen, requires_grad=True)
    k, v = torch.randn(1, 2, 23, 8, generator=gen), torch.randn(1, 2, 23, 8, generator=gen)
    out = flash_attention_tiled(q, k, v, block_q=4, block_k=8)
    torch.testing.assert_close(out, sdpa(q, k, v, False))
    (grad,) = torch.autograd.grad(out.square().sum(), q)
    (expected,) = torch.autograd.grad(sdpa(q, k, v, False).square().sum(), q)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("exact_call", [
    lambda q, k, v: sparse_transformer_attention(q, k, v, causal=True, stride=64),
    lambda q, k, v: longformer_attention(q, k, v, causal=True, window=64),
    lambda q, k, v: bigbird_attention(q, k, v, causal=True, window=64, n_global=2, n_random=2),
], ids=["strided-stride>=T", "longformer-window>=T", "bigbird-window>=T"])
def test_sparse_patterns_covering_everything_are_exact(exact_call):
    q, k, v = qkv(H_kv=2)
    torch.testing.assert_close(exact_call(q, k, v), sdpa(q, k, v, True), atol=1e-5, rtol=1e-5)


BAD = [
    (lambda q, k, v: longformer_attention(q, k, v, window=0), ValueError, "window=0"),
    (lambda q, k, v: bigbird_attention(q, k, v, window=-1), ValueError, "window=-1"),
    (lambda q, k, v: sparse_transformer_attention(q, k, v, stride=0), ValueError, "stride=0"),
    (lambda q, k, v: nystrom_attention(q, k, v, landmarks=0), ValueError, "landmarks=0"),
    (lambda q, k, v: nystrom_attention(q, k, v, landmarks=38), ValueError, "landmarks=38"),
    (lambda q, k, v: nystrom_attention(q, k, v, causal=True), ValueError, "cannot be causal"),
    (lambda q, k, v: performer_attention(q, k, v, features=0), ValueError, "features=0"),
    (lambda q, k, v: linformer_attention(q, k, v, proj_k=linformer_projection(32, 8)), ValueError,
     "max_len=32"),
    (lambda q, k, v: linformer_attention(q, k, v, causal=True, proj_k=linformer_projection(64, 8)), ValueError,
     "cannot be causal"),
    (lambda q, k, v: reformer_attention(q, k, v), ValueError, "shares queries and keys"),
    (lambda q, k, v: reformer_attention(q, None, v, n_buckets=3), ValueError, "n_buckets=3"),
    (lambda q, k, v: flash_attention_tiled(q, k, v, block_q=0), ValueError, "block_q=0"),
    (lambda q, k, v: softmax_attention(q, k[:, :3], v[:, :3]), ValueError, "must divide"),
    (lambda q, k, v: linear_attention(q, k[..., :8], v), ValueError, "k.shape"),
    (lambda q, k, v: linear_attention(q[0], k, v), ValueError, "(B, H, T, D)"),
    (lambda q, k, v: linear_attention(q, k[:, :, :5], v[:, :, :5], causal=True), ValueError, "as many keys"),
    (lambda q, k, v: linear_attention(q.long(), k, v), TypeError, "floating point"),
]


@pytest.mark.parametrize("call, error, words", BAD, ids=[b[2] for b in BAD])
def test_bad_input_is_refused_with_a_clear_message(call, error, words):
    q, k, v = qkv()
    with pytest.raises(error, match=re.escape(words)):
        call(q, k, v)


def tiny_llama(n_kv_heads=2, seed=0):
    torch.manual_seed(seed)
    return Llama(LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, d_ff=64,
                             max_seq_len=64)).eval()


def test_swapping_in_an_exact_method_keeps_the_logits():
    model, ids = tiny_llama(), torch.randint(0, 64, (2, 29))
    with torch.no_grad():
        before = model(ids)
        after = use_attention(model, flash_attention_tiled, block_q=8, block_k=8)(ids)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


CAUSAL_SWAPS = [
    (longformer_attention, {"window": 4}),
    (bigbird_attention, {"window": 2, "n_global": 1, "n_random": 3}),
    (sparse_transformer_attention, {"stride": 5}),
    (performer_attention, {"features": 16}),
    (linear_attention, {}),
]


@pytest.mark.parametrize("method, options", CAUSAL_SWAPS, ids=lambda x: getattr(x, "__name__", ""))
def test_swapping_in_an_approximation_changes_the_logits_and_stays_causal(method, options):
    model, ids = tiny_llama(n_kv_heads=4 if options.get("shared_qk") else 2), torch.randint(0, 64, (1, 32))
    with torch.no_grad():
        before = model(ids)
        use_attention(model, method, **options)
        after = model(ids)
        changed_future = ids.clone()
        changed_future[0, 20:] = (ids[0, 20:] + 1) % 64
        after_changed = model(changed_future)
    assert (after - before).abs().max() > 1e-3  # not full softmax attention
    torch.testing.assert_close(after[0, :20], after_changed[0, :20])  # tokens ≥ 20 never reach tokens < 20


def test_a_swap_that_cannot_be_causal_leaves_the_model_unchanged():
    model = tiny_llama()
    attn_before = [block.attn for block in model.blocks]
    with pytest.raises(ValueError, match="cannot be causal"):
        use_attention(model, nystrom_attention, landmarks=4)
    assert [block.attn for block in model.blocks] == attn_before
    with pytest.raises(ValueError, match="shared_qk=True needs n_kv_heads == n_heads"):
        use_attention(model, reformer_attention, shared_qk=True)


def test_reformer_sums_only_past_values_but_its_chunks_depend_on_later_tokens():
    gen = torch.Generator().manual_seed(0)
    q, v = torch.randn(1, 2, 32, 8, generator=gen), torch.randn(1, 2, 32, 8, generator=gen)
    out = reformer_attention(q, None, v, causal=True, n_buckets=4, chunk_size=4)
    later_values = v.clone()
    later_values[:, :, 20:] += 1
    torch.testing.assert_close(reformer_attention(q, None, later_values, causal=True, n_buckets=4, chunk_size=4)[:, :, :20],
                               out[:, :, :20])  # values of later tokens never enter
    later_queries = q.clone()
    later_queries[:, :, 20:] = torch.randn(1, 2, 12, 8, generator=gen)
    moved = reformer_attention(later_queries, None, v, causal=True, n_buckets=4, chunk_size=4)[:, :, :20]
    assert (moved - out[:, :, :20]).abs().max() > 1e-3  # but their buckets re-cut the sorted chunks
