"""Jacobi and Lookahead decoding: guess several future tokens, refine the guesses in parallel, verify them.

Papers: Santilli, Severino, Postolache, Maiorca, Mancusi, Marin, Rodolà (2023), "Accelerating Transformer
Inference for Translation via Parallel Decoding", arXiv:2305.10427 — §3 (Jacobi decoding as a fixed-point
iteration); Fu, Bailis, Stoica, Zhang (2024), "Break the Sequential Dependency of LLM Inference Using
Lookahead Decoding", arXiv:2402.02057 — §3 (lookahead branch, n-gram pool, verification branch).
Implements, in one target pass per step (a token tree, ``decoding.tree_generate``):
  Jacobi branch: a chain of W guesses g_1..g_W for the W positions after the pending token. The pass returns
  the greedy next token after every prefix, which is one Jacobi update  g_i ← argmax p(· | x, g_<i)  for all
  i at once; the guesses that already equal their update are the fixed point and are accepted (at least one
  token per step), the updated guesses seed the next step;
  n-gram pool (Lookahead): the Jacobi updates of the last N steps, read along the diagonal — position a from
  step t − N + 1, a + 1 from step t − N + 2, …, a + N − 1 from step t, each predicted right after the one
  before it — are stored as n-grams keyed by their first token;
  verification branch (Lookahead): up to G pooled n-grams that start with the pending token hang from the root
  as extra chains and are verified in the same pass.
candidates = 0 gives plain Jacobi decoding. All variants output exactly greedy decoding.
Glossary: W ``window`` · N ``ngram`` · G ``candidates`` · g guesses · t step.
Left out: Lookahead's 2-D window that keeps N − 1 past levels as inputs of the pass (we keep the past levels
          as outputs and read the diagonals from them), and its multi-GPU lookahead parallelism.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

import torch

from effref.inference.decoding import DecodeResult, TreeProposer, tree_generate
from effref.models.llama import Llama


@dataclass(frozen=True)
class LookaheadConfig:
    window: int = 5  # W guesses refined per step
    ngram: int = 3  # N tokens per pooled n-gram
    candidates: int = 3  # G pooled n-grams verified per step; 0: Jacobi decoding
    pool_size: int = 8  # n-grams kept per first token (the oldest are dropped)
    seed: int = 0  # the first guesses are random tokens of the prompt

    def __post_init__(self) -> None:
        if self.window < 1 or self.ngram < 2 or self.candidates < 0 or self.pool_size < 1:
            raise ValueError(f"window={self.window}, ngram={self.ngram}, candidates={self.candidates}, pool_size="
                             f"{self.pool_size}: need window >= 1, ngram >= 2, candidates >= 0, pool_size >= 1")


class LookaheadProposer(TreeProposer):
    def __init__(self, config: LookaheadConfig):
        self.config, self.rng = config, random.Random(config.seed)
        self.max_nodes = 1 + config.window + config.candidates * (config.ngram - 1)
        self.guesses: dict[int, int] = {}  # absolute position -> current guess
        self.steps: deque[dict[int, int]] = deque(maxlen=config.ngram)  # the last N Jacobi updates
        self.pool: dict[int, dict[tuple[int, ...], None]] = {}  # first token -> ordered set of continuations

    def propose(self, history: list[int], hidden: torch.Tensor) -> tuple[list[int], list[int]]:
        root, W = len(history) - 1, self.config.window  # ``root``: the pending token's position
        window = [self.guesses.get(root + i, self.rng.choice(history)) for i in range(1, W + 1)]
        tokens, parents = [history[-1]] + window, list(range(-1, W))  # the Jacobi chain
        for gram in list(self.pool.get(history[-1], {}))[::-1][:self.config.candidates]:  # the newest G
            parents += [0] + list(range(len(tokens), len(tokens) + len(gram) - 1))  # a chain under the root
            tokens += list(gram)
        self.root = root
        return tokens, parents

    def observe(self, tokens: list[int], parents: list[int], predicted: list[int], path: list[int]) -> None:
        W, N = self.config.window, self.config.ngram
        update = {self.root + 1 + i: predicted[i] for i in range(W + 1)}  # Jacobi: argmax after every prefix
        self.steps.append(update)
        accepted_to = self.root + len(path)  # the new pending token's position
        self.guesses = {pos: tok for pos, tok in update.items() if pos > accepted_to}
        if len(self.steps) == N:  # read the diagonals of the last N updates
            for a in self.steps[0]:
                gram = [self.steps[j].get(a + j) for j in range(N)]
                if None not in gram:
                    grams = self.pool.setdefault(gram[0], {})
                    grams.pop(tuple(gram[1:]), None)
                    grams[tuple(gram[1:])] = None  # most recent last
                    if len(grams) > self.config.pool_size:
                        grams.pop(next(iter(grams)))


def lookahead_generate(model: Llama, prompt: torch.Tensor, max_new_tokens: int,
                       config: LookaheadConfig = LookaheadConfig(), eos_id: int | None = None) -> DecodeResult:
    """Greedy decoding with Jacobi guesses and (``config.candidates`` > 0) Lookahead's n-gram pool."""
    return tree_generate(model, prompt, max_new_tokens, LookaheadProposer(config), eos_id)
