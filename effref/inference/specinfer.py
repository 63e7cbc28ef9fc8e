"""SpecInfer: a draft model expands a token tree, and the target verifies the whole tree in one pass.

Paper: Miao, Oliaro, Zhang, Cheng, Wang, Zhang, Wong, Zhu, Yang, Shi, Shi, Chen, Jia (2024), "SpecInfer:
Accelerating Large Language Model Serving with Tree-based Speculative Inference and Verification",
arXiv:2305.09781 — §3 (expansion-based token tree construction), §4 (tree-based parallel decoding with a
topology-aware causal mask), greedy verification (§4.3).
Implements: expansion-based construction with one draft model. The root is the pending token; every node at
depth d − 1 gets the draft's top-k_d tokens as children, ``branching`` = (k_1, …, k_D), so the tree holds
k_1 + k_1·k_2 + … + k_1···k_D candidate tokens. The draft scores one level per forward pass, with the tree mask
over the levels already in its cache (``decoding.forward_tokens``); the target then scores the whole tree in
one pass and keeps the longest root-to-node path that greedy decoding would have produced
(``decoding.tree_generate``). branching = (1,) * γ is greedy speculative decoding with γ drafts.
Glossary: k_d ``branching[d - 1]`` children per node at depth d · D tree depth · base the root's position.
Left out: merge-based trees from several boost-tuned draft models, stochastic verification (multi-step
          speculative sampling) and the paper's distributed serving runtime.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from effref.inference.decoding import DecodeResult, TreeProposer, forward_tokens, tree_generate, tree_mask
from effref.inference.speculative import check_pair
from effref.models.llama import Llama


class DraftTreeProposer(TreeProposer):
    """Builds SpecInfer's expansion tree with ``draft``, keeping the draft's KV cache of the committed text."""

    def __init__(self, draft: Llama, branching: Sequence[int], max_len: int):
        if not branching or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in branching):
            raise ValueError(f"branching={tuple(branching)!r} needs at least one depth and integers >= 1 "
                             "(children per node at each depth), e.g. (2, 2, 1)")
        self.draft, self.branching = draft, tuple(branching)
        self.max_nodes = 1 + sum(math.prod(self.branching[:d + 1]) for d in range(len(self.branching)))
        self.cache = draft.new_cache(1, max_len + self.max_nodes)
        self.draft_calls = 0

    @torch.no_grad()
    def propose(self, history: list[int], hidden: torch.Tensor) -> tuple[list[int], list[int]]:
        device = self.cache.k[0].device
        feed = history[self.cache.length:]  # committed tokens the draft has not seen, ending with the root
        logits = self.draft(torch.tensor([feed], device=device), self.cache)[:, -1:]  # (1, 1, V) at the root
        tokens, parents, level = [history[-1]], [-1], [0]  # ``level``: node indices at the current depth
        base = self.cache.length - 1  # the root's position
        for depth, k in enumerate(self.branching, start=1):
            if depth > 1:  # score the previous level in one pass: it sees the prefix and its own ancestors
                mask = tree_mask(parents)[level[0]:, 1:]  # (|level|, tree nodes cached so far + |level|)
                ids = torch.tensor([[tokens[i] for i in level]], device=device)
                logits, _ = forward_tokens(self.draft, ids, self.cache, torch.full((len(level),), base + depth - 1),
                                           mask)  # (1, |level|, V)
            self.draft_calls += 1
            top = logits[0].topk(k, dim=-1).indices.tolist()  # (|level|, k) children of every node
            children = []
            for node, kids in zip(level, top):
                for token in kids:
                    tokens.append(token)
                    parents.append(node)
                    children.append(len(tokens) - 1)
            level = children
        self.cache.truncate(base + 1)  # forget the tree; the root (history[-1]) stays cached
        return tokens, parents


@torch.no_grad()
def specinfer_generate(target: Llama, draft: Llama, prompt: torch.Tensor, max_new_tokens: int,
                       branching: Sequence[int] = (2, 2, 1), eos_id: int | None = None) -> DecodeResult:
    """Greedy decoding of ``target`` accelerated by a ``draft``-built token tree: output equals greedy decoding."""
    check_pair(target, draft)
    proposer = DraftTreeProposer(draft, branching, prompt.shape[1] + max_new_tokens + 1)
    return tree_generate(target, prompt, max_new_tokens, proposer, eos_id)
