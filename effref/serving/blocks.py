"""Block bookkeeping for a paged KV cache: reference-counted blocks, block tables, copy-on-write, prefix sharing.

Paper: Kwon, Li, Zhuang, Sheng, Zheng, Yu, Gonzalez, Zhang, Stoica (2023), "Efficient Memory Management for
Large Language Model Serving with PagedAttention", arXiv:2309.06180 — §4.2 (KV cache manager, block tables),
§4.4 (parallel sampling and beam search: shared blocks, reference counts, copy-on-write; shared prefixes).
Implements: a pool of ``num_blocks`` physical blocks of ``block_size`` token slots each. A sequence's logical
block j (its tokens j·b .. j·b + b − 1) lives in physical block ``table.blocks[j]``. Blocks carry reference
counts: forking a sequence (another sample of the same prompt, a beam) copies only its table and increments
the counts; the first write into a block whose count is > 1 gives the writer a private copy (copy-on-write),
reported as a (source, destination) pair for the cache to copy. Prefix sharing: every *full* block is
registered under the key (physical id of the previous block, its b token ids); a new prompt whose leading
blocks match reuses them instead of allocating, and its prefill skips those tokens. ``truncate`` shortens a
table (speculative decoding's rollback): blocks past the kept tokens lose a reference, and a kept block left
partly filled is unregistered, since its tail will be rewritten. The key is exact, not a
hash: a live block's predecessor is live too (every table holds whole prefixes), so its id is unambiguous.
Glossary: b block_size · refcount[i] tables holding block i · slot = block · b + offset, a token's address.
Left out: keeping freed prefix blocks around as an evictable cache (vLLM's automatic prefix caching): here a
          prefix is shared only while some sequence still holds it. (Swapping to CPU lives in the scheduler.)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


class OutOfBlocksError(RuntimeError):
    """The block pool has no free block left; the scheduler answers by preempting a sequence."""


class BlockAllocator:
    """A free list of physical block ids with a reference count per block."""

    def __init__(self, num_blocks: int):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks!r} must be an integer >= 1")
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        self._free = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """A fresh block with reference count 1; ``OutOfBlocksError`` when none is free."""
        if not self._free:
            raise OutOfBlocksError(f"all {self.num_blocks} KV blocks are in use; free or preempt a sequence, "
                                   "or create the cache with more blocks")
        block = self._free.popleft()
        self.refcount[block] = 1
        return block

    def _check(self, block: int, action: str) -> None:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block id {block} is outside [0, {self.num_blocks})")
        if self.refcount[block] == 0:
            raise ValueError(f"cannot {action} block {block}: it is free (double free, or never allocated)")

    def incref(self, block: int) -> None:
        """One more table holds ``block`` (a fork, or a shared prefix)."""
        self._check(block, "share")
        self.refcount[block] += 1

    def free(self, block: int) -> bool:
        """Drop one reference; True when that was the last one and the block returned to the pool."""
        self._check(block, "free")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self._free.append(block)
            return True
        return False


@dataclass
class BlockTable:
    """One sequence's logical-to-physical map and the token ids that occupy its slots."""

    block_size: int
    blocks: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def slot(self, position: int) -> int:
        """The flat cache address (block · b + offset) of the token at ``position``."""
        if not 0 <= position < self.num_tokens:
            raise IndexError(f"position {position} is outside the {self.num_tokens} tokens of this table")
        return self.blocks[position // self.block_size] * self.block_size + position % self.block_size


class BlockManager:
    """Tables on top of an allocator: prompt allocation with prefix sharing, appends with copy-on-write, forks."""

    def __init__(self, num_blocks: int, block_size: int = 16, share_prefixes: bool = True):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} must be an integer >= 1 (16 is the usual choice)")
        self.allocator, self.block_size, self.share_prefixes = BlockAllocator(num_blocks), block_size, share_prefixes
        self._by_key: dict[tuple[int, tuple[int, ...]], int] = {}  # (previous block, b tokens) -> full block
        self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # inverse, to unregister on the last free

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _register(self, table: BlockTable, j: int) -> None:
        """Make full logical block j of ``table`` findable by later prompts with the same prefix."""
        if not self.share_prefixes:
            return
        b = self.block_size
        key = (table.blocks[j - 1] if j else -1, tuple(table.tokens[j * b:(j + 1) * b]))
        if key not in self._by_key and table.blocks[j] not in self._key_of:
            self._by_key[key], self._key_of[table.blocks[j]] = table.blocks[j], key

    def _shared_prefix(self, tokens: list[int]) -> list[int]:
        """Physical blocks already holding the leading full blocks of ``tokens`` (never the last token's)."""
        shared, b = [], self.block_size
        if self.share_prefixes:
            for j in range((len(tokens) - 1) // b):  # keep >= 1 token to compute, for the next-token logits
                block = self._by_key.get((shared[-1] if shared else -1, tuple(tokens[j * b:(j + 1) * b])))
                if block is None:
                    break
                shared.append(block)
        return shared

    def can_allocate(self, tokens: list[int]) -> bool:
        return self.blocks_needed(len(tokens)) - len(self._shared_prefix(tokens)) <= self.num_free

    def allocate(self, tokens: list[int]) -> tuple[BlockTable, int]:
        """A table for a new prompt and the number of its leading tokens whose keys/values are already cached."""
        if not tokens:
            raise ValueError("tokens is empty; a sequence needs at least one token")
        if not self.can_allocate(tokens):
            raise OutOfBlocksError(f"a {len(tokens)}-token prompt needs {self.blocks_needed(len(tokens))} blocks"
                                   f" but only {self.num_free} are free")
        table = BlockTable(self.block_size, self._shared_prefix(tokens), list(tokens))
        for block in table.blocks:
            self.allocator.incref(block)
        cached = len(table.blocks) * self.block_size
        while len(table.blocks) < self.blocks_needed(len(tokens)):
            table.blocks.append(self.allocator.allocate())
        for j in range(len(tokens) // self.block_size):
            self._register(table, j)
        return table, cached

    def can_append(self, table: BlockTable) -> bool:
        """Whether ``append`` would succeed: it needs a block if the last one is full or shared."""
        last_full = table.num_tokens % self.block_size == 0
        return self.num_free >= 1 or not (last_full or self.allocator.refcount[table.blocks[-1]] > 1)

    def append(self, table: BlockTable, token: int) -> tuple[int, int] | None:
        """Reserve the slot of one more token; returns a (source, destination) block copy when copy-on-write."""
        copy = None
        if table.num_tokens % self.block_size == 0:  # last block full (or none yet): open a new one
            table.blocks.append(self.allocator.allocate())
        elif self.allocator.refcount[table.blocks[-1]] > 1:  # shared partial block: write into a private copy
            new = self.allocator.allocate()
            copy = (table.blocks[-1], new)
            self.allocator.free(table.blocks[-1])
            table.blocks[-1] = new
        table.tokens.append(token)
        if table.num_tokens % self.block_size == 0:
            self._register(table, len(table.blocks) - 1)
        return copy

    def fork(self, table: BlockTable) -> BlockTable:
        """A second table sharing every block of ``table`` (parallel sampling, beam search)."""
        for block in table.blocks:
            self.allocator.incref(block)
        return BlockTable(self.block_size, list(table.blocks), list(table.tokens))

    def _release(self, block: int) -> None:
        """Drop one reference; a block that returns to the pool stops being findable as a prefix."""
        if self.allocator.free(block) and block in self._key_of:
            del self._by_key[self._key_of.pop(block)]

    def truncate(self, table: BlockTable, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` tokens (rollback of rejected speculative drafts).

        Whole blocks past them lose this table's reference (returning to the pool if no one else holds them).
        A kept block that is left partly filled is unregistered as a prefix block: its later slots will be
        rewritten (in place if the table holds it alone, else ``append`` copies it first).
        """
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 0 <= num_tokens <= table.num_tokens:
            raise ValueError(f"num_tokens={num_tokens!r} must be an integer in [0, {table.num_tokens}] "
                             "(a table can only be shortened)")
        keep = self.blocks_needed(num_tokens)
        for block in table.blocks[keep:]:
            self._release(block)
        del table.blocks[keep:], table.tokens[num_tokens:]
        if num_tokens % self.block_size and table.blocks[-1] in self._key_of:
            del self._by_key[self._key_of.pop(table.blocks[-1])]

    def free(self, table: BlockTable) -> None:
        """Release the table's references (blocks no one else holds return to the pool)."""
        for block in table.blocks:
            self._release(block)
        table.blocks, table.tokens = [], []
