"""Distilling step-by-step on a task whose rationales can be checked: column addition of two numbers.

Paper: Hsieh, Li, Yeh, Nakhost, Fujii, Ratner, Krishna, Lee, Pfister (2023), "Distilling Step-by-Step!
Outperforming Larger Language Models with Less Training Data and Smaller Model Sizes", arXiv:2305.02301, §3.2.
Implements the multi-task objective  L = L_label + λ L_rationale : the student sees the same input twice, behind
two task prefixes — "L" (predict the label) and "R" (predict the rationale) — and only the label task is used
at test time, so rationales cost nothing at inference. The task: a + b for ``digits``-digit numbers,
  label example       L37+48:58.                 (the sum 85 written ones digit first, see below)
  rationale example   R37+48:7+8=15,3+4+1=8.     (one column per step, ones first, carry added explicitly)
The answer is written in reverse (ones first), the order in which column addition produces digits and the
format that Lee et al. (2023, arXiv:2307.03381) found small transformers learn fastest; ``reverse_answer=False``
writes it normally (at this tiny scale neither student then learns much within the chapter's budget).
The rationale teacher here is a program, not an LLM: the paper prompts a 540B PaLM for chain-of-thought
rationales, but the 135M teacher of this book does not add two-digit numbers reliably (the chapter measures
it), so a deterministic column-addition routine writes rationales that are correct by construction
(``check_rationale`` re-derives them). A character tokenizer keeps the student tiny.
Each example's loss is its mean over its target characters; the trainer's weighted mean over a batch of b
problems is then (Σ L_label + λ Σ L_rationale) / (b (1 + λ)): the paper's loss up to a constant factor.
Glossary: a, b operands · x = "a+b:" input · r rationale · y label (the sum) · λ ``rationale_weight``.
Left out: the paper's T5 students and its datasets (e-SNLI, ANLI, CQA, SVAMP); rationales from an LLM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from effref.distillation.trainer import DistillConfig, DistillResult, distill
from effref.models.llama import Llama, LlamaConfig

CHARS = "_0123456789+=,:.LR"  # "_" pads; "L" / "R" are the task prefixes; "." ends an answer
PAD = 0


def encode(text: str) -> list[int]:
    unknown = sorted(set(text) - set(CHARS))
    if unknown:
        raise ValueError(f"characters {unknown} are not in the task alphabet {CHARS!r}")
    return [CHARS.index(c) for c in text]


def decode(ids) -> str:
    return "".join(CHARS[int(i)] for i in ids)


def rationale(a: int, b: int, digits: int) -> str:
    """The program teacher: the columns of a + b, ones first, e.g. (37, 48) -> "7+8=15,3+4+1=8"."""
    steps, carry = [], 0
    for col in range(digits):
        x, y = a // 10 ** col % 10, b // 10 ** col % 10
        total = x + y + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}")
        carry = total // 10
    return ",".join(steps)


def check_rationale(a: int, b: int, text: str, digits: int) -> bool:
    """True when ``text`` adds the right digits column by column, carries right, and spells out a + b."""
    steps = text.split(",")
    if len(steps) != digits:
        return False
    carry, answer = 0, 0
    for col, step in enumerate(steps):
        m = re.fullmatch(r"(\d)\+(\d)(?:\+(1))?=(\d+)", step)
        if m is None or int(m[1]) != a // 10 ** col % 10 or int(m[2]) != b // 10 ** col % 10:
            return False
        if int(m[3] or 0) != carry or int(m[4]) != int(m[1]) + int(m[2]) + carry:
            return False
        answer += int(m[4]) % 10 * 10 ** col
        carry = int(m[4]) // 10
    return answer + carry * 10 ** digits == a + b


@dataclass
class AdditionTask:
    """Disjoint train / test problems (a, b) with ``digits``-digit operands."""

    digits: int = 2
    n_train: int = 500
    n_test: int = 300
    reverse_answer: bool = True
    seed: int = 0

    def answer(self, a: int, b: int) -> str:
        return str(a + b)[::-1] if self.reverse_answer else str(a + b)

    def problems(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        lo, hi = 10 ** (self.digits - 1), 10 ** self.digits
        total = (hi - lo) ** 2
        if self.n_train + self.n_test > total:
            raise ValueError(f"n_train + n_test = {self.n_train + self.n_test} exceeds the {total} distinct "
                             f"{self.digits}-digit problems; ask for fewer")
        g = torch.Generator().manual_seed(self.seed)
        pick = torch.randperm(total, generator=g)[: self.n_train + self.n_test].tolist()
        pairs = [(lo + i // (hi - lo), lo + i % (hi - lo)) for i in pick]
        return pairs[: self.n_train], pairs[self.n_train:]


def build_examples(problems: list[tuple[int, int]], task: AdditionTask, with_rationale: bool,
                   rationale_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ids (rows, L) and target weights (rows, L - 1); with rationales, rows alternate label / rationale."""
    texts, weights = [], []
    for a, b in problems:
        prompts = [("L", task.answer(a, b), 1.0)]
        if with_rationale:
            prompts.append(("R", rationale(a, b, task.digits), rationale_weight))
        for prefix, target, weight in prompts:
            x = f"{prefix}{a}+{b}:"
            texts.append(x + target + ".")
            n = len(target) + 1  # the target characters and the final "."
            weights.append((len(x), n, weight / n))  # per-example mean, times λ for rationales
    L = max(len(t) for t in texts)
    ids = torch.full((len(texts), L), PAD, dtype=torch.long)
    w = torch.zeros(len(texts), L - 1)
    for i, (text, (start, n, value)) in enumerate(zip(texts, weights)):
        ids[i, : len(text)] = torch.tensor(encode(text))
        w[i, start - 1: start - 1 + n] = value  # position j predicts character j + 1
    return ids, w


def student_config(d_model: int = 64, n_layers: int = 2, max_seq_len: int = 48) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(CHARS), d_model=d_model, n_layers=n_layers, n_heads=4, n_kv_heads=4,
                       d_ff=4 * d_model, max_seq_len=max_seq_len, tie_embeddings=True)


@torch.no_grad()
def label_accuracy(model: nn.Module, problems: list[tuple[int, int]], task: AdditionTask) -> float:
    """Fraction of problems whose greedy label-task answer (up to ".") spells a + b."""
    prompts = torch.tensor([encode(f"L{a}+{b}:") for a, b in problems])  # (n, P), equal lengths
    out = model.generate(prompts, task.digits + 2, temperature=0.0)[:, prompts.shape[1]:]  # (n, digits + 2)
    answers = [decode(row).split(".")[0] for row in out]
    return sum(ans == task.answer(a, b) for ans, (a, b) in zip(answers, problems)) / len(problems)


def train_step_by_step(task: AdditionTask, with_rationale: bool, config: DistillConfig | None = None,
                       rationale_weight: float = 1.0, model_seed: int = 0,
                       progress: bool = True) -> tuple[DistillResult, float]:
    """Train a fresh tiny student on label-only or label + rationale examples; return it and test accuracy."""
    cfg = config or DistillConfig(objective="supervised", steps=300, lr=3e-3, batch_size=32)
    if cfg.objective != "supervised":
        raise ValueError(f"config.objective={cfg.objective!r}: step-by-step trains with 'supervised' NLL on "
                         "label and rationale text")
    train, test = task.problems()
    ids, weights = build_examples(train, task, with_rationale, rationale_weight)
    cfg = replace(cfg, group_size=2 if with_rationale else 1)  # a batch holds both tasks of the same problems
    torch.manual_seed(model_seed)
    student = Llama(student_config(max_seq_len=ids.shape[1]))
    result = distill(student, None, ids, cfg, weights=weights, progress=progress)
    return result, label_accuracy(student, test, task)
