"""KV-cache policies against brute force: on tiny random queries and keys, every policy must keep exactly its
budget and exactly the tokens its rule names (recomputed here from explicit softmax scores with Python sets);
with a budget at least the sequence length, every policy must equal the full cache bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from effref.inference.kv_eval import CacheStack, decode_greedy, decode_nll
from effref.inference.kv_policies import (
    EvictingCache,
    H2OCache,
    ScissorhandsCache,
    StreamingCache,
    attention_weights,
)
from effref.models.llama import KVCache

N_HEADS, H, D = 4, 2, 4  # query heads, key/value heads, head size of the brute-force tests


def head_attention(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Group-mean attention of one query row over ``keys`` for one KV head: q (N_HEADS // H, D), keys (S, D)."""
    return (q @ keys.T / math.sqrt(D)).softmax(-1).mean(0)  # (S,)


class BruteForce:
    """Per KV head: the kept positions and the statistics of each, updated one query row at a time."""

    def __init__(self, policy: str, budget: int, **knobs):
        self.policy, self.budget, self.knobs = policy, budget, knobs
        self.kept = [[] for _ in range(H)]
        self.score = [{} for _ in range(H)]  # H2O: accumulated attention
        self.rows = [[] for _ in range(H)]  # Scissorhands: per past step, the positions below the uniform share

    def step(self, t0: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """Add tokens t0 .. t0 + T − 1 with queries q (N_HEADS, T, D) and keys k (H, T, D), then evict."""
        T, group = k.shape[1], N_HEADS // H
        for h in range(H):
            new = list(range(t0, t0 + T))
            visible_all = self.kept[h] + new
            key_of = {**{p: self.key_store[h][p] for p in self.kept[h]}, **{t0 + i: k[h, i] for i in range(T)}}
            self.key_store[h].update({t0 + i: k[h, i] for i in range(T)})
            for i in range(T):
                visible = self.kept[h] + new[:i + 1]
                a = head_attention(q[h * group:(h + 1) * group, i], torch.stack([key_of[p] for p in visible]))
                for p, w in zip(visible, a.tolist()):
                    self.score[h][p] = self.score[h].get(p, 0.0) + w
                self.rows[h].append({p for p, w in zip(visible, a.tolist()) if w < 1 / len(visible)})
            self.kept[h] = visible_all
            if len(visible_all) > self.budget:
                self.kept[h] = sorted(self.select(h, visible_all))

    def select(self, h: int, cand: list[int]) -> list[int]:
        if self.policy == "streaming":
            sinks = self.knobs["sinks"]
            return cand[:sinks] + cand[len(cand) - (self.budget - sinks):]
        recent = self.knobs["recent"]
        old, newest = cand[:len(cand) - recent], cand[len(cand) - recent:]
        if self.policy == "h2o":
            return sorted(old, key=lambda p: -self.score[h][p])[:self.budget - recent] + newest
        window = self.rows[h][-self.knobs["history"]:]  # scissorhands: fewest "below uniform" counts stay
        count = {p: sum(p in row for row in window) for p in old}
        keep = self.budget - self.knobs["batch_drop"] + 1 - recent
        return sorted(old, key=lambda p: (count[p], -p))[:keep] + newest


def run_both(policy: str, cls, budget: int, chunks: list[int], seed: int, **knobs):
    g = torch.Generator().manual_seed(seed)
    cache = cls(1, 1, H, D, budget=budget, **knobs)
    brute = BruteForce(policy, budget, **knobs)
    brute.key_store = [{} for _ in range(H)]
    t = 0
    for T in chunks:
        q = torch.randn(1, N_HEADS, T, D, generator=g) * 2
        k, v = torch.randn(1, H, T, D, generator=g) * 2, torch.randn(1, H, T, D, generator=g)
        cache.queries[0] = q
        before = cache.kept[0]
        keys, _ = cache.update(0, k, v)
        assert keys.shape[2] == before + T and before <= budget  # kept ones, then the new ones
        cache.advance(T)
        brute.step(t, q[0], k[0])
        t += T
        for h in range(H):
            assert sorted(cache.pos[0][0, h, :cache.kept[0]].tolist()) == brute.kept[h], f"head {h} at t={t}"
    return cache


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunks", [[1] * 20, [6] + [1] * 14])
def test_h2o_keeps_the_recent_and_the_heavy_hitters(seed: int, chunks: list[int]) -> None:
    cache = run_both("h2o", H2OCache, 6, chunks, seed, recent=2)
    assert cache.kept[0] == 6


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("batch_drop", [1, 3])
def test_scissorhands_drops_the_most_often_unimportant(seed: int, batch_drop: int) -> None:
    cache = run_both("scissorhands", ScissorhandsCache, 7, [5] + [1] * 17, seed, recent=2, history=4,
                     batch_drop=batch_drop)
    assert 7 - batch_drop + 1 <= cache.kept[0] <= 7


@pytest.mark.parametrize("chunks", [[1] * 15, [9, 1, 1, 1]])
def test_streaming_keeps_sinks_and_window(chunks: list[int]) -> None:
    cache = run_both("streaming", StreamingCache, 5, chunks, 0, sinks=2)
    assert cache.pos[0][0, 0, :5].tolist() == [0, 1, sum(chunks) - 3, sum(chunks) - 2, sum(chunks) - 1]


def test_attention_weights_match_a_loop_over_heads() -> None:
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(1, N_HEADS, 3, D, generator=g), torch.randn(1, H, 5, D, generator=g)
    a = attention_weights(q, keys)  # (1, H, 3, 5)
    for h in range(H):
        for i in range(3):
            visible = 5 - 3 + i + 1
            expected = head_attention(q[0, 2 * h:2 * h + 2, i], keys[0, h, :visible])
            torch.testing.assert_close(a[0, h, i, :visible], expected)
            assert a[0, h, i, visible:].abs().sum() == 0


POLICIES = [(StreamingCache, {"sinks": 2}), (H2OCache, {"recent": 3}), (ScissorhandsCache, {"history": 8})]


@pytest.mark.parametrize("cls, knobs", POLICIES, ids=lambda x: getattr(x, "__name__", ""))
def test_a_budget_covering_the_sequence_is_the_full_cache_bit_for_bit(tiny_llama, random_ids, cls, knobs) -> None:
    model, ids = tiny_llama(scale=1.0), random_ids(2, 30)
    full = decode_nll(model, ids, model.new_cache(2, 30), prefill=4, progress=False)
    ours = decode_nll(model, ids, cls.for_model(model, 2, budget=30, **knobs), prefill=4, progress=False)
    assert torch.equal(ours, full)


@pytest.mark.parametrize("cls, knobs", POLICIES, ids=lambda x: getattr(x, "__name__", ""))
def test_every_layer_keeps_exactly_its_budget_in_our_llama(tiny_llama, random_ids, cls, knobs) -> None:
    model, ids = tiny_llama(scale=1.0), random_ids(2, 24)
    cache = cls.for_model(model, 2, budget=8, **knobs)
    with torch.no_grad():
        model(ids[:, :5], cache)
        assert cache.kept == [5] * 3
        for t in range(5, 24):
            model(ids[:, t:t + 1], cache)
            assert cache.kept == [min(t + 1, 8)] * 3 and cache.length == t + 1
    positions = cache.pos[0][..., :8]
    assert (positions.diff(dim=-1) > 0).all() and (positions[..., -1] == 23).all()  # in order, newest kept
    nll = decode_nll(model, ids, cls.for_model(model, 2, budget=8, **knobs), prefill=5, progress=False)
    full = decode_nll(model, ids, KVCache(3, 2, 2, 8, 24), prefill=5, progress=False)
    assert torch.equal(nll[:, :7], full[:, :7]) and not torch.equal(nll, full)  # same until the first eviction


def test_a_stack_of_policies_equals_each_policy_alone(tiny_llama, random_ids) -> None:
    model, ids = tiny_llama(scale=1.0), random_ids(2, 20)
    alone = [decode_nll(model, ids, cls.for_model(model, 2, budget=6, **knobs), prefill=3, progress=False)
             for cls, knobs in POLICIES]
    stack = CacheStack([cls.for_model(model, 2, budget=6, **knobs) for cls, knobs in POLICIES])
    together = decode_nll(model, ids.repeat(3, 1), stack, prefill=3, progress=False)  # (6, 19)
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)
    prompt = ids[:, :8]
    stack = CacheStack([cls.for_model(model, 2, budget=6, **knobs) for cls, knobs in POLICIES])
    generated = decode_greedy(model, prompt.repeat(3, 1), 6, stack, progress=False)
    for i, (cls, knobs) in enumerate(POLICIES):
        single = decode_greedy(model, prompt, 6, cls.for_model(model, 2, budget=6, **knobs), progress=False)
        assert torch.equal(generated[2 * i:2 * i + 2], single)


def test_a_stack_of_different_budgets_is_rejected(tiny_llama, random_ids) -> None:
    model = tiny_llama(scale=1.0)
    stack = CacheStack([StreamingCache.for_model(model, 1, budget=4, sinks=1),
                        StreamingCache.for_model(model, 1, budget=6, sinks=1)])
    with pytest.raises(ValueError, match="same number of keys"):
        decode_nll(model, random_ids(2, 12), stack, prefill=3, progress=False)


@pytest.mark.parametrize("make, error, message", [
    (lambda: StreamingCache(1, 1, 1, 4, budget=0), ValueError, "budget=0"),
    (lambda: StreamingCache(1, 1, 1, 4, budget=4, sinks=4), ValueError, "sinks=4"),
    (lambda: H2OCache(1, 1, 1, 4, budget=4, recent=5), ValueError, "recent=5"),
    (lambda: ScissorhandsCache(1, 1, 1, 4, budget=4, batch_drop=4), ValueError, "batch_drop=4"),
    (lambda: ScissorhandsCache(1, 1, 1, 4, budget=4, history=0), ValueError, "history=0"),
    (lambda: StreamingCache(1, 1, 1, 4, budget=8).truncate(0), NotImplementedError, "cannot roll back"),
])
def test_bad_arguments_are_rejected(make, error, message: str) -> None:
    with pytest.raises(error, match=message):
        make()


def test_scoring_policy_without_query_hooks_says_how_to_create_it(tiny_llama, random_ids) -> None:
    model = tiny_llama(seed=5)  # a fresh model: no hooks installed on it
    with pytest.raises(RuntimeError, match="H2OCache.for_model"):
        model(random_ids(1, 4), H2OCache(3, 1, 2, 8, budget=4))
    assert issubclass(H2OCache, EvictingCache) and issubclass(EvictingCache, KVCache)
