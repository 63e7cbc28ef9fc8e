"""kNN-augmented attention: exact search against a full sort, memory attention against dense attention, the gate
and the first-in-first-out memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effref.longcontext.knn_memory import KNNMemory, knn_attention, knn_augmented_attention


def filled_memory(n=40, capacity=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    memory = KNNMemory(2, 3, 8, capacity, dtype=torch.float64)
    memory.add(torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64),
               torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64))
    return memory, torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64)


def test_search_is_exact_knn():
    memory, q = filled_memory()
    scores, indices = memory.search(q, 6)
    for b in range(2):
        for h in range(3):
            for t in range(5):
                dots = [float(q[b, h, t] @ memory.keys[b, h, i]) for i in range(len(memory))]
                best = sorted(range(len(memory)), key=lambda i: -dots[i])[:6]  # brute force, one key at a time
                assert indices[b, h, t].tolist() == best
                assert scores[b, h, t].tolist() == pytest.approx([dots[i] for i in best])


def test_attending_to_every_memory_key_is_dense_attention_and_fewer_keys_approach_it():
    memory, q = filled_memory()
    dense = F.scaled_dot_product_attention(q, memory.keys, memory.values)
    torch.testing.assert_close(knn_attention(q, memory, len(memory)), dense)
    errors = [(knn_attention(q, memory, k) - dense).abs().max().item() for k in (1, 8, 32)]
    assert errors[0] > errors[1] > errors[2] > 0  # the truncated softmax converges as k grows


def test_the_gate_mixes_memory_and_local_attention():
    memory, _ = filled_memory()
    q, k, v = torch.randn(3, 2, 3, 5, 8, dtype=torch.float64).unbind()
    local = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    remote = knn_attention(q, memory, 4)
    closed, opened = torch.full((3,), -1e4), torch.full((3,), 1e4)
    torch.testing.assert_close(knn_augmented_attention(q, k, v, memory, 4, closed), local)
    torch.testing.assert_close(knn_augmented_attention(q, k, v, memory, 4, opened), remote)
    half = knn_augmented_attention(q, k, v, memory, 4, torch.zeros(3))
    torch.testing.assert_close(half, (local + remote) / 2)
    empty = KNNMemory(2, 3, 8, 10, dtype=torch.float64)
    torch.testing.assert_close(knn_augmented_attention(q, k, v, empty, 4, opened), local)


def test_memory_drops_the_oldest_pairs_and_finds_a_planted_key():
    memory = KNNMemory(1, 1, 4, capacity=6)
    keys = torch.arange(10.0)[None, None, :, None].expand(1, 1, 10, 4)  # key i is (i, i, i, i)
    memory.add(keys[:, :, :7], keys[:, :, :7])
    memory.add(keys[:, :, 7:], keys[:, :, 7:])
    assert len(memory) == 6 and memory.keys[0, 0, :, 0].tolist() == [4, 5, 6, 7, 8, 9]
    _, index = memory.search(torch.ones(1, 1, 1, 4), 1)
    assert memory.keys[0, 0, index[0, 0, 0], 0] == 9  # the largest inner product with (1, 1, 1, 1)


def test_bad_inputs_are_refused():
    memory, q = filled_memory()
    with pytest.raises(ValueError, match="capacity=0 must be a positive integer"):
        KNNMemory(1, 1, 4, 0)
    with pytest.raises(ValueError, match="top_k=0 must be a positive integer"):
        memory.search(q, 0)
    with pytest.raises(ValueError, match="memory is empty"):
        KNNMemory(1, 1, 4, 4).search(torch.randn(1, 1, 2, 4), 1)
    with pytest.raises(ValueError, match=r"must both be \(B, H, T, d\)"):
        memory.add(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8))
    with pytest.raises(ValueError, match="one logit per head"):
        knn_augmented_attention(q, q, q, memory, 2, torch.zeros(2))
    with pytest.raises(ValueError, match=r"must all be \(B, H, T, d\)"):
        knn_augmented_attention(q, q[:, :2], q, memory, 2, torch.zeros(3))
