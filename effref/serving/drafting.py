"""Batched drafting for speculative decoding in the engine: the draft model on its own paged KV cache.

Papers: Leviathan, Kalman, Matias (2023), arXiv:2211.17192, and Chen et al. (2023), arXiv:2302.01318 — the
draft proposes x_1..x_n with x_j ~ q(· | prefix, x_<j) (or its argmax at temperature 0). The batching is the
engine's own business, not the papers': production servers (vLLM, for one) run the draft the same way, as a
second paged model stepped over every sequence at once.
Implements: ``PagedDraft`` keeps one block table per running sequence in a block pool of its own. A table
holds the tokens whose *draft* keys/values are cached, always a prefix of the sequence's committed tokens.
``propose`` runs rounds: round 1 feeds every drafting sequence its tokens the draft has not cached yet (at
least the newest one; a whole prompt the first time) and round j the (j−1)-th draft of every sequence that
still wants more, each round one ragged ``paged_forward`` over all of them. Every round draws one token per
sequence from its own random stream and records q. After the target has verified, ``sync`` cuts each table
back to the committed tokens (rejected drafts lose their slots) and frees the tables of sequences that
stopped running (finished or preempted: a preempted sequence's draft state is rebuilt like its target's).
A sequence whose table cannot grow because the draft pool is full simply drafts fewer tokens this step.
Glossary: n_i drafts wanted by sequence i (≤ γ) · q_j the draft distribution at round j · table = the draft's
          ``BlockTable`` of a sequence, keyed by request id.
Left out: tree-shaped drafts, drafts that share the target's cache (self-speculation), choosing n_i from
          each sequence's acceptance rate.
"""

from __future__ import annotations

import torch

from effref.inference.speculative import Sampling
from effref.models.llama import Llama
from effref.serving.blocks import BlockManager, BlockTable
from effref.serving.paged_cache import PagedKVCache, RaggedBatch, paged_forward
from effref.serving.scheduler import Sequence


class PagedDraft:
    """A draft model stepping every drafting sequence at once over a pool of ``num_blocks`` KV blocks."""

    def __init__(self, model: Llama, num_blocks: int, block_size: int):
        self.model = model.eval()
        self.manager = BlockManager(num_blocks, block_size)  # prompts shared by several requests are cached once
        self.cache = PagedKVCache.for_model(model, num_blocks, block_size)
        self.tables: dict[int, BlockTable] = {}  # request id -> the tokens whose draft keys/values are cached

    def _extend(self, seq: Sequence, tokens: list[int], copies: list[tuple[int, int]]) -> int | None:
        """Reserve draft slots for ``tokens`` after what ``seq``'s table holds; returns the first position to
        compute, or None (nothing reserved) when the pool cannot hold them."""
        table = self.tables.get(seq.request_id)
        if table is None:
            if not self.manager.can_allocate(tokens):
                return None
            table, cached = self.manager.allocate(tokens)  # cached: leading tokens already in shared blocks
            self.tables[seq.request_id] = table
            return cached
        start = table.num_tokens
        for token in tokens:
            if not self.manager.can_append(table):
                self.manager.truncate(table, start)  # a copy-on-write block it made stays, and is copied
                return None
            copy = self.manager.append(table, token)
            if copy is not None:
                copies.append(copy)
        return start

    @torch.no_grad()
    def propose(self, seqs: list[Sequence], wanted: list[int], sampling: Sampling,
                ) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Up to ``wanted[i]`` draft tokens after ``seqs[i].tokens`` and their distributions q (n_i, vocab)."""
        drafts: list[list[int]] = [[] for _ in seqs]
        rows: list[list[torch.Tensor]] = [[] for _ in seqs]
        feed = {}  # sequence index -> tokens to feed this round
        for i, (seq, n) in enumerate(zip(seqs, wanted)):
            if n > 0:
                table = self.tables.get(seq.request_id)
                feed[i] = seq.tokens[table.num_tokens if table else 0:]
        while feed:
            order, starts, copies = [], [], []
            for i, tokens in feed.items():
                start = self._extend(seqs[i], tokens, copies)
                if start is not None:
                    order.append(i)
                    starts.append(start)
            self.cache.copy_blocks(copies)
            if not order:
                break
            batch = RaggedBatch.build([self.tables[seqs[i].request_id] for i in order], starts,
                                      self.cache.k.device)
            logits = paged_forward(self.model, self.cache, batch)  # (len(order), vocab)
            feed = {}
            for i, row in zip(order, logits):
                x, q = sampling.draw(row, seqs[i].generator)  # q (vocab,)
                drafts[i].append(x)
                rows[i].append(q)
                if len(drafts[i]) < wanted[i]:
                    feed[i] = [x]
        return drafts, [torch.stack(r) if r else torch.zeros(0) for r in rows]

    def sync(self, running: list[Sequence]) -> None:
        """After a step: keep each running sequence's committed prefix, free the tables of all others."""
        alive = {seq.request_id: seq for seq in running}
        for request_id in list(self.tables):
            seq, table = alive.get(request_id), self.tables[request_id]
            if seq is None:
                self.manager.free(self.tables.pop(request_id))
            else:  # the committed tokens with keys/values are a prefix of what the table holds, or vice versa
                self.manager.truncate(table, min(table.num_tokens, seq.num_computed))
