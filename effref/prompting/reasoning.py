"""Multi-step reasoning prompts: chain-of-thought, self-consistency and Skeleton-of-Thought.

Papers: Wei, Wang, Schuurmans, Bosma, Ichter, Xia, Chi, Le, Zhou (2022), "Chain-of-Thought Prompting Elicits
Reasoning in Large Language Models", NeurIPS, arXiv:2201.11903 — §2; Kojima, Gu, Reid, Matsuo, Iwasawa (2022),
"Large Language Models are Zero-Shot Reasoners", arXiv:2205.11916 (the "Let's think step by step" trigger);
Wang, Wei, Schuurmans, Le, Chi, Narang, Chowdhery, Zhou (2023), "Self-Consistency Improves Chain of Thought
Reasoning in Language Models", ICLR, arXiv:2203.11171 — §2, Eq. 1 (unweighted vote); Ning, Lin, Zhou, Wang,
Yang, Wang (2024), "Skeleton-of-Thought: Prompting LLMs for Efficient Parallel Generation", ICLR,
arXiv:2307.15337 — §2.1.
Implements:
  chain-of-thought prompt: exemplars "Q: question / A: rationale The answer is a." before the test question.
  self-consistency: sample m rationales r_i → answers a_i at temperature T, answer
      â = argmax_a Σ_i 1[a_i = a]    (Eq. 1 with equal weights; ties to the answer reached first).
  Skeleton-of-Thought: stage 1 decodes a short numbered outline greedily; stage 2 asks for every point's
      expansion in its own prompt and decodes them all *at once* as one batch of the serving engine
      (``effref.serving.Engine``), so the latency is the outline's plus that of the longest point, not the sum.
Glossary: m ``n_samples`` · T ``temperature`` · r_i rationale · a_i its extracted answer · B points.
Left out: the probability-weighted votes of Wang et al. (their Table 1 finds them no better than the plain
vote); SoT's router that decides which questions suit it, and its API-parallel variant.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

ANSWER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Exemplar:
    """One worked example: the question, its step-by-step rationale, and the final answer."""

    question: str
    rationale: str
    answer: str


def chain_of_thought_prompt(exemplars: Sequence[Exemplar], question: str, reasoning: bool = True) -> str:
    """A few-shot prompt; with ``reasoning=False`` the exemplars show only the answer (standard prompting)."""
    if not question.strip():
        raise ValueError("question is empty; pass the question to answer")
    shots = []
    for ex in exemplars:
        steps = f"{ex.rationale} " if reasoning else ""
        shots.append(f"Q: {ex.question}\nA: {steps}The answer is {ex.answer}.\n\n")
    return "".join(shots) + f"Q: {question}\nA:"


def zero_shot_cot_prompt(question: str) -> str:
    """Kojima et al.'s zero-shot trigger after the question."""
    if not question.strip():
        raise ValueError("question is empty; pass the question to answer")
    return f"Q: {question}\nA: Let's think step by step."


def extract_answer(text: str) -> str | None:
    """The number after the first "The answer is", else the last number in ``text``; None when there is none."""
    head = text.split("The answer is", 1)
    if len(head) == 2 and (found := ANSWER.search(head[1])):
        return found.group()
    numbers = ANSWER.findall(head[0].split("\n\n")[0])  # only the model's own answer, not a next "Q:"
    return numbers[-1] if numbers else None


def majority_vote(answers: Sequence[Hashable | None]) -> tuple[Hashable | None, Counter]:
    """The most frequent non-None answer (ties to the one that appears first) and the vote counts."""
    if len(answers) == 0:
        raise ValueError("answers is empty; sample at least one rationale before voting")
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, counts
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top), counts


def self_consistency(engine, tokenizer, prompts: Sequence[str], n_samples: int, max_new_tokens: int,
                     temperature: float = 0.7, top_k: int | None = 40, seed: int = 0,
                     extract: Callable[[str], Hashable | None] = extract_answer
                     ) -> list[list[Hashable | None]]:
    """Sample ``n_samples`` rationales per prompt; each prompt's extracted answers, in sampling order.

    One engine call: the engine forks each prompt after its prefill, so its samples share the prompt's KV
    blocks, and all samples of all prompts decode in the same batched steps. Vote with ``majority_vote(answers[:m])`` for any m ≤ ``n_samples``.
    """
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass at least one question prompt")
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples} must be at least 1")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: self-consistency samples; use a temperature > 0 "
                         "(the paper uses 0.5–0.7)")
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    outs = engine.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                           n_samples=n_samples)
    # requests 0 .. P − 1 are the prompts' first samples; the forks follow in admission order (first come,
    # first served), n_samples − 1 per prompt
    P, m = len(prompts), n_samples - 1
    samples = [[outs[p]] + outs[P + p * m:P + (p + 1) * m] for p in range(P)]
    return [[extract(tokenizer.decode(s)) for s in row] for row in samples]


@dataclass
class SkeletonResult:
    outline: str
    points: list[str]
    expansions: list[str]
    outline_seconds: float
    expand_seconds: float
    new_tokens: int  # outline + expansions


def parse_outline(text: str, max_points: int) -> list[str]:
    """The numbered points "1. …", "2. …" of an outline, at most ``max_points``."""
    points = [m.group(1).strip() for m in re.finditer(r"^\s*\d+[.)]\s*(.+)$", text, flags=re.MULTILINE)]
    return [p for p in points if p][:max_points]


def skeleton_of_thought(engine, tokenizer, question: str, n_points: int = 3, outline_tokens: int = 32,
                        point_tokens: int = 24,
                        outline_template: str = ("Question: {question}\nGive a short outline of {n} points.\n"
                                                 "Outline:\n1."),
                        point_template: str = ("Question: {question}\nOutline:\n{outline}\n"
                                               "Expand point {i} ({point}) in one or two sentences.\n"
                                               "Point {i}:")) -> SkeletonResult:
    """Skeleton-of-Thought with greedy decoding: outline, then all points expanded in one batched decode."""
    if n_points < 1 or outline_tokens < 1 or point_tokens < 1:
        raise ValueError(f"n_points={n_points}, outline_tokens={outline_tokens}, point_tokens={point_tokens} "
                         "must all be at least 1")
    start = time.perf_counter()
    prompt = outline_template.format(question=question, n=n_points)
    outline_ids = engine.generate([tokenizer(prompt, add_special_tokens=False).input_ids], outline_tokens)[0]
    outline = "1." + tokenizer.decode(outline_ids)
    outline_seconds = time.perf_counter() - start
    points = parse_outline(outline, n_points)
    if not points:
        raise RuntimeError(f"the model's outline has no numbered points: {outline!r}; try another "
                           "outline_template or more outline_tokens")
    listed = "\n".join(f"{i}. {p}" for i, p in enumerate(points, 1))
    prompts = [tokenizer(point_template.format(question=question, outline=listed, i=i, point=p),
                         add_special_tokens=False).input_ids for i, p in enumerate(points, 1)]
    start = time.perf_counter()
    expansions = engine.generate(prompts, point_tokens)  # one batch: every point decodes in the same steps
    expand_seconds = time.perf_counter() - start
    return SkeletonResult(outline, points, [tokenizer.decode(e) for e in expansions], outline_seconds,
                          expand_seconds, len(outline_ids) + sum(len(e) for e in expansions))
