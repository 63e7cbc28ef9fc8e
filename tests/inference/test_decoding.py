"""Tree attention against brute force: every node of a tree scored in one pass equals its root-to-node path
scored as an ordinary sequence; greedy tree verification and cache compaction continue exactly."""

from __future__ import annotations

import random

import pytest
import torch

from effref.inference.decoding import (
    TreeProposer,
    commit_path,
    forward_tokens,
    tree_depths,
    tree_generate,
    tree_mask,
    verify_tree_greedy,
)


def ancestors_or_self(parents: list[int], i: int) -> set[int]:
    seen = {i}
    while parents[i] != -1:
        i = parents[i]
        seen.add(i)
    return seen


def random_tree(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [-1] + [rng.randrange(i) for i in range(1, n)]


@pytest.mark.parametrize("seed", range(40))
def test_tree_mask_and_depths_match_ancestor_walks(seed: int) -> None:
    n = 1 + seed % 12
    parents = random_tree(n, seed)
    mask, depth = tree_mask(parents), tree_depths(parents)
    for i in range(n):
        assert {j for j in range(n) if mask[i, j]} == ancestors_or_self(parents, i)
        assert depth[i] == len(ancestors_or_self(parents, i)) - 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_forward_equals_each_path_as_a_sequence(tiny_llama, random_ids, seed: int) -> None:
    model = tiny_llama(seed=seed, scale=1.0)
    prefix = random_ids(1, 7, seed=seed)
    parents = random_tree(9, seed)
    tokens = random_ids(1, 9, seed=seed + 10)
    cache = model.new_cache(1, 32)
    with torch.no_grad():
        model(prefix, cache)
        logits, _ = forward_tokens(model, tokens, cache, 7 + tree_depths(parents), tree_mask(parents))
        for i in range(len(parents)):
            path = sorted(ancestors_or_self(parents, i))  # parents come first, so sorted is root-to-node order
            alone = model(torch.cat([prefix, tokens[:, path]], dim=1))[0, -1]
            torch.testing.assert_close(logits[0, i], alone, rtol=1e-4, atol=1e-4)


def test_greedy_verification_follows_the_argmax_path() -> None:
    parents = [-1, 0, 0, 1, 1, 2, 3]
    tokens = [9, 5, 6, 7, 8, 7, 3]
    predicted = [6, 0, 7, 3, 0, 1, 4]  # root wants 6 (node 2), node 2 wants 7 (node 5), node 5 wants 1: stop
    assert verify_tree_greedy(tokens, parents, predicted) == [0, 2, 5]
    assert verify_tree_greedy(tokens, parents, [4] * 7) == [0]


def test_commit_path_then_decoding_equals_a_plain_forward(tiny_llama, random_ids) -> None:
    model = tiny_llama(scale=1.0)
    prefix, parents = random_ids(1, 5), [-1, 0, 0, 2, 2, 4]
    tokens = random_ids(1, 6, seed=3)
    path = [0, 2, 4, 5]
    cache = model.new_cache(1, 32)
    with torch.no_grad():
        model(prefix, cache)
        forward_tokens(model, tokens, cache, 5 + tree_depths(parents), tree_mask(parents))
        commit_path(cache, 5, path)
        nxt = random_ids(1, 2, seed=4)
        after = model(nxt, cache)
        reference = model(torch.cat([prefix, tokens[:, path], nxt], dim=1))[:, -2:]
    assert cache.length == 5 + len(path) + 2
    torch.testing.assert_close(after, reference, rtol=1e-4, atol=1e-4)


def test_tree_generate_without_drafts_is_greedy_decoding(tiny_llama, random_ids) -> None:
    model = tiny_llama()
    prompt = random_ids(1, 6)
    result = tree_generate(model, prompt, 20, TreeProposer())
    assert torch.equal(result.tokens, model.generate(prompt, 20))
    assert result.target_calls == 19 and result.tokens_per_call == 1.0


@pytest.mark.parametrize("parents, message", [
    ([], "not a token tree"),
    ([0, 0], "not a token tree"),
    ([-1, 0, 3, 1], "not a token tree"),
    ([-1, -1], "not a token tree"),
])
def test_bad_trees_are_rejected(parents: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tree_mask(parents)


def test_bad_prompts_are_rejected(tiny_llama, random_ids) -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match="shape \\(1, T\\)"):
        tree_generate(model, random_ids(2, 4), 5, TreeProposer())
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        tree_generate(model, random_ids(1, 4), 0, TreeProposer())
    with pytest.raises(ValueError, match="exceeds max_seq_len=256"):
        tree_generate(model, random_ids(1, 250), 10, TreeProposer())
