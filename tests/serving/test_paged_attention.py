"""PagedAttention reference vs dense attention on contiguous keys/values scattered into random blocks."""

import pytest
import torch
import torch.nn.functional as F

from effref.serving import gather_kv, paged_attention


def scatter_into_blocks(keys, values, block_size, num_blocks, seed):
    """Write each sequence's contiguous (L_i, H_kv, d) keys/values into randomly chosen blocks of a pool."""
    g = torch.Generator().manual_seed(seed)
    H_kv, d = keys[0].shape[1:]
    k_cache = torch.randn(num_blocks, block_size, H_kv, d, generator=g)  # garbage everywhere else
    v_cache = torch.randn(num_blocks, block_size, H_kv, d, generator=g)
    free = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max(-(-len(k) // block_size) for k in keys) + 1
    tables = torch.full((len(keys), max_blocks), -1, dtype=torch.int32)
    for i, (k, v) in enumerate(zip(keys, values)):
        for j in range(-(-len(k) // block_size)):
            block = free.pop()
            tables[i, j] = block
            chunk = slice(j * block_size, (j + 1) * block_size)
            k_cache[block, :len(k[chunk])] = k[chunk]
            v_cache[block, :len(v[chunk])] = v[chunk]
    return k_cache, v_cache, tables


@pytest.mark.parametrize("n_heads,n_kv_heads,block_size,lens,seed", [
    (4, 4, 16, [1, 16, 17, 40], 0),      # MHA, block-boundary lengths
    (4, 2, 16, [33, 5, 64], 1),         # GQA
    (8, 1, 4, [3, 9, 1, 12, 30], 2),    # MQA, small blocks
    (6, 3, 8, [100], 3),                # one long sequence
])
def test_paged_attention_equals_dense_sdpa(n_heads, n_kv_heads, block_size, lens, seed):
    g = torch.Generator().manual_seed(100 + seed)
    d = 16
    keys = [torch.randn(L, n_kv_heads, d, generator=g) for L in lens]
    values = [torch.randn(L, n_kv_heads, d, generator=g) for L in lens]
    q = torch.randn(len(lens), n_heads, d, generator=g)
    k_cache, v_cache, tables = scatter_into_blocks(keys, values, block_size, 64, seed)
    out = paged_attention(q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32))
    for i, (k, v) in enumerate(zip(keys, values)):
        groups = n_heads // n_kv_heads
        kd = k.transpose(0, 1).repeat_interleave(groups, 0)  # (H, L, d)
        vd = v.transpose(0, 1).repeat_interleave(groups, 0)
        ref = F.scaled_dot_product_attention(q[i][:, None], kd, vd)[:, 0]  # (H, d)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-5)


def test_gather_kv_returns_the_scattered_tokens_in_order():
    keys = [torch.arange(10 * 2 * 3, dtype=torch.float32).view(10, 2, 3)]
    k_cache, _, tables = scatter_into_blocks(keys, keys, 4, 8, seed=5)
    torch.testing.assert_close(gather_kv(k_cache, tables[0], 10), keys[0])


def test_custom_scale_matches_manual_softmax():
    g = torch.Generator().manual_seed(7)
    k = [torch.randn(5, 1, 4, generator=g)]
    v = [torch.randn(5, 1, 4, generator=g)]
    q = torch.randn(1, 1, 4, generator=g)
    kc, vc, t = scatter_into_blocks(k, v, 2, 6, seed=1)
    out = paged_attention(q, kc, vc, t, torch.tensor([5]), scale=0.3)
    a = torch.softmax(0.3 * k[0][:, 0] @ q[0, 0], dim=0)  # (5,)
    torch.testing.assert_close(out[0, 0], a @ v[0][:, 0])


def _args():
    return (torch.zeros(2, 4, 8), torch.zeros(6, 4, 2, 8), torch.zeros(6, 4, 2, 8),
            torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), torch.tensor([5, 8], dtype=torch.int32))


@pytest.mark.parametrize("index,value,message", [
    (0, torch.zeros(2, 1, 4, 8), "q must have shape"),
    (2, torch.zeros(6, 4, 1, 8), "same shape"),
    (1, torch.zeros(6, 4, 2), "k_cache must have shape"),
    (3, torch.zeros(2, 2), "integer block ids"),
    (3, torch.tensor([[0, 1]], dtype=torch.int32), "context_lens must be"),
    (4, torch.tensor([0, 8], dtype=torch.int32), "context_lens must lie in"),
    (4, torch.tensor([5, 9], dtype=torch.int32), "context_lens must lie in"),
    (3, torch.tensor([[0, 1], [2, 6]], dtype=torch.int32), "outside"),
    (0, torch.zeros(2, 3, 8), "not a multiple"),
    (0, torch.zeros(2, 4, 4), "d_head"),
])
def test_bad_inputs_are_reported(index, value, message):
    args = list(_args())
    args[index] = value
    if index == 1:
        args[2] = value.clone()
    with pytest.raises(ValueError, match=message):
        paged_attention(*args)


def test_unused_table_entries_may_be_negative():
    args = list(_args())
    args[3] = torch.tensor([[0, 1], [2, -1]], dtype=torch.int32)
    args[4] = torch.tensor([5, 4], dtype=torch.int32)
    assert paged_attention(*args).shape == (2, 4, 8)
