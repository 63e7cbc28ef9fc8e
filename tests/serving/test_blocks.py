"""Block allocator and manager: no leaks or double frees under random workloads (with truncation), copy-on-write,
prefix sharing."""

import random

import pytest

from effref.serving import BlockAllocator, BlockManager, OutOfBlocksError

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # listed in the test extras; the seeded version below runs either way
    given = None

KINDS = ["new", "append", "fork", "free", "truncate"]


def run_workload(ops, num_blocks, block_size, share):
    """Brute-force model: a slot array written like a cache; every live table must read back its tokens."""
    manager = BlockManager(num_blocks, block_size, share_prefixes=share)
    memory = [None] * (num_blocks * block_size)  # what each cache slot holds
    tables = []

    def write(table, start):
        for p in range(start, table.num_tokens):
            memory[table.slot(p)] = table.tokens[p]

    for op, r, n in ops:
        try:
            if op == "new":
                prompt = [r % 2, (r // 2) % 2, (r // 4) % 3][:n] * 2  # few distinct prompts: prefixes repeat
                table, cached = manager.allocate(prompt)
                write(table, cached)  # the engine computes only the tokens after the cached prefix
                tables.append(table)
            elif tables and op == "append":
                table = tables[r % len(tables)]
                copy = manager.append(table, r % 5)
                if copy is not None:  # copy-on-write: the cache copies the block before writing
                    src, dst = copy
                    memory[dst * block_size:(dst + 1) * block_size] = memory[src * block_size:(src + 1) * block_size]
                write(table, table.num_tokens - 1)
            elif tables and op == "fork":
                tables.append(manager.fork(tables[r % len(tables)]))
            elif tables and op == "free":
                manager.free(tables.pop(r % len(tables)))
            elif tables and op == "truncate":  # speculative rollback: later appends rewrite the cut-off slots
                table = tables[r % len(tables)]
                manager.truncate(table, (r // 7) % (table.num_tokens + 1))
        except OutOfBlocksError:
            pass
        held = [b for t in tables for b in t.blocks]
        for block in range(num_blocks):  # reference count = number of tables holding the block
            assert manager.allocator.refcount[block] == held.count(block)
        assert manager.num_free == num_blocks - len(set(held))
        for table in tables:
            assert [memory[table.slot(p)] for p in range(table.num_tokens)] == table.tokens
        for (prev, tokens), block in manager._by_key.items():  # a findable prefix block is some table's full block
            assert any(t.blocks[j] == block and (t.blocks[j - 1] if j else -1) == prev
                       and tuple(t.tokens[j * block_size:(j + 1) * block_size]) == tokens
                       for t in tables for j in range(t.num_tokens // block_size))
    for table in tables:
        manager.free(table)
    assert manager.num_free == num_blocks and not manager._by_key and not manager._key_of


def test_seeded_random_workloads_never_leak_and_every_table_reads_its_own_tokens():
    rng = random.Random(0)
    for _ in range(300):
        ops = [(rng.choice(KINDS), rng.randrange(10**6), rng.randint(1, 3)) for _ in range(rng.randint(1, 60))]
        run_workload(ops, rng.randint(1, 12), rng.randint(1, 4), rng.random() < 0.5)


if given is not None:
    @settings(max_examples=150, deadline=None)
    @given(ops=st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 10**6), st.integers(1, 3)),
                        min_size=1, max_size=60),
           num_blocks=st.integers(1, 12), block_size=st.integers(1, 4), share=st.booleans())
    def test_property_random_workloads_never_leak(ops, num_blocks, block_size, share):
        run_workload(ops, num_blocks, block_size, share)
else:
    @pytest.mark.skip(reason="hypothesis is not installed (pip install hypothesis; it is in the test extras)")
    def test_property_random_workloads_never_leak():
        pass


def test_copy_on_write_copies_only_a_shared_partial_block():
    m = BlockManager(8, block_size=4, share_prefixes=False)
    parent, _ = m.allocate([1, 2, 3, 4, 5, 6])  # blocks: one full, one holding 2 of 4 slots
    child = m.fork(parent)
    assert child.blocks == parent.blocks and m.num_free == 6
    copy = m.append(child, 7)
    assert copy == (parent.blocks[1], child.blocks[1]) and child.blocks[1] != parent.blocks[1]
    assert child.blocks[0] == parent.blocks[0]  # the full block stays shared
    assert m.append(child, 8) is None  # now private: no second copy
    assert m.append(parent, 9) is None  # parent's block is no longer shared either
    full, _ = m.allocate([1, 2, 3, 4])
    twin = m.fork(full)
    assert m.append(twin, 5) is None and twin.blocks[0] == full.blocks[0]  # full last block: a new block


def test_prefix_sharing_reuses_full_blocks_of_a_common_prefix():
    m = BlockManager(16, block_size=4)
    a, cached_a = m.allocate(list(range(10)))  # blocks [0..3], [4..7], partial [8, 9]
    b, cached_b = m.allocate(list(range(8)) + [50, 51, 52])
    assert cached_a == 0 and cached_b == 8 and b.blocks[:2] == a.blocks[:2] and b.blocks[2] != a.blocks[2]
    assert m.num_free == 16 - 3 - 1
    c, cached_c = m.allocate([99] + list(range(1, 12)))  # differs in the first block: nothing to reuse
    assert cached_c == 0 and not set(c.blocks) & set(a.blocks)
    _d, cached_d = m.allocate([0, 1, 2, 3])  # the last token's block is always computed, for its logits
    assert cached_d == 0
    for t in (a, b):
        m.free(t)
    _e, cached_e = m.allocate(list(range(8)) + [1])  # the prefix went away with its last holder
    assert cached_e == 0


def test_appended_tokens_become_shareable_once_a_block_fills():
    m = BlockManager(8, block_size=2)
    a, _ = m.allocate([5])
    m.append(a, 6)  # first block now full: (-1, (5, 6))
    b, cached = m.allocate([5, 6, 7])
    assert cached == 2 and b.blocks[0] == a.blocks[0]


def test_truncate_frees_whole_blocks_and_unshares_a_partly_kept_one():
    m = BlockManager(8, block_size=4)
    a, _ = m.allocate(list(range(10)))  # blocks: [0..3] [4..7] [8, 9]
    m.truncate(a, 10)  # no-op
    assert m.num_free == 5
    m.truncate(a, 6)  # third block freed; second kept but now partial: no longer a findable prefix
    assert len(a.blocks) == 2 and a.tokens == list(range(6)) and m.num_free == 6
    b, cached = m.allocate(list(range(8)) + [1])
    assert cached == 4 and b.blocks[0] == a.blocks[0] and b.blocks[1] != a.blocks[1]
    m.append(a, 60)  # a's second block is private again: written in place, no copy
    child = m.fork(a)
    m.truncate(child, 2)  # shared blocks only lose the child's reference
    assert m.allocator.refcount[a.blocks[0]] == 3 and m.allocator.refcount[a.blocks[1]] == 1
    assert m.append(child, 7) == (a.blocks[0], child.blocks[0])  # then copy-on-write protects a
    m.truncate(child, 0)
    assert child.blocks == [] and m.append(child, 5) is None
    for t in (a, b, child):
        m.free(t)
    assert m.num_free == 8 and not m._by_key and not m._key_of
    with pytest.raises(ValueError, match="num_tokens=3 must be an integer in \\[0, 1\\]"):
        m.truncate(m.allocate([1])[0], 3)


def test_exhausted_pool_and_double_free_are_reported():
    alloc = BlockAllocator(2)
    x, _ = alloc.allocate(), alloc.allocate()
    with pytest.raises(OutOfBlocksError, match="all 2 KV blocks are in use"):
        alloc.allocate()
    alloc.free(x)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(x)
    m = BlockManager(2, block_size=2)
    with pytest.raises(OutOfBlocksError, match="needs 3 blocks but only 2 are free"):
        m.allocate([1, 2, 3, 4, 5])
    assert m.num_free == 2  # a failed allocation takes nothing


@pytest.mark.parametrize("make,message", [
    (lambda: BlockAllocator(0), "num_blocks=0"),
    (lambda: BlockAllocator(2.5), "num_blocks=2.5"),
    (lambda: BlockManager(4, block_size=0), "block_size=0"),
    (lambda: BlockManager(4).allocate([]), "tokens is empty"),
    (lambda: BlockAllocator(4).incref(9), "outside"),
    (lambda: BlockAllocator(4).incref(1), "it is free"),
])
def test_bad_inputs_are_reported(make, message):
    with pytest.raises(ValueError, match=message):
        make()
