"""LLMA: inference with reference — copy a span of a related text as the draft, verify it in one pass.

Paper: Yang, Ge, Wang, Jiao, Jiang, Yang, Majumder, Wei (2023), "Inference with Reference: Lossless
Acceleration of Large Language Models", arXiv:2304.04487 — §2 (match-and-copy trigger, parallel verification).
Implements: when the last n generated tokens (the pending one included) occur in a reference token sequence,
the k tokens that follow that occurrence are copied as a chain of drafts; the model checks them in one
forward pass and keeps the prefix greedy decoding agrees with, plus its own next token
(``decoding.tree_generate``), so the output equals greedy decoding. When nothing matches, the step is a plain
decoding step. Among several occurrences the one just after the previously copied span is preferred (copying
tends to continue where it left off), else the first.
Glossary: n ``match_len`` · k ``copy_len`` · reference the related text (a retrieved document, the prompt's
          own passage, the previous draft of an edited text).
Left out: the paper's retrieval of the reference documents and its batched multi-reference search.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from effref.inference.decoding import DecodeResult, TreeProposer, tree_generate
from effref.models.llama import Llama


class ReferenceProposer(TreeProposer):
    """Proposes the continuation of the latest n tokens in ``reference`` as a chain of ``copy_len`` drafts."""

    def __init__(self, reference: Sequence[int], match_len: int = 2, copy_len: int = 8):
        if match_len < 1 or copy_len < 1:
            raise ValueError(f"match_len={match_len}, copy_len={copy_len}: both must be >= 1")
        if len(reference) <= match_len:
            raise ValueError(f"reference has {len(reference)} tokens; it needs more than match_len={match_len}")
        self.reference, self.n, self.k = [int(t) for t in reference], match_len, copy_len
        self.max_nodes, self.cursor = copy_len + 1, -1  # cursor: where the last copied span ended
        self.where: dict[tuple[int, ...], list[int]] = {}  # n-gram -> start positions of its continuations
        for i in range(len(self.reference) - match_len):
            self.where.setdefault(tuple(self.reference[i:i + match_len]), []).append(i + match_len)

    def propose(self, history: list[int], hidden: torch.Tensor) -> tuple[list[int], list[int]]:
        starts = self.where.get(tuple(history[-self.n:]), [])
        if not starts:
            return [history[-1]], [-1]
        start = self.cursor if self.cursor in starts else starts[0]
        copied = self.reference[start:start + self.k]
        self.cursor = start + len(copied)
        return [history[-1]] + copied, list(range(-1, len(copied)))  # a chain: node i's parent is i − 1

    def observe(self, tokens: list[int], parents: list[int], predicted: list[int], path: list[int]) -> None:
        if len(tokens) > 1:  # continue from where the accepted copy ends (+1 for the bonus token)
            self.cursor += len(path) - len(tokens) + 1


def llma_generate(model: Llama, prompt: torch.Tensor, max_new_tokens: int, reference: Sequence[int] | torch.Tensor,
                  match_len: int = 2, copy_len: int = 8, eos_id: int | None = None) -> DecodeResult:
    """Greedy decoding of ``model`` with drafts copied from ``reference`` token ids; output equals greedy."""
    if isinstance(reference, torch.Tensor):
        reference = reference.reshape(-1).tolist()
    return tree_generate(model, prompt, max_new_tokens, ReferenceProposer(reference, match_len, copy_len), eos_id)
