"""What a teacher hands a student: cached top-k distributions (white-box) or its own text (black-box).

Papers: Hinton, Vinyals, Dean (2015), arXiv:1503.02531 (soft targets); Kim & Rush (2016), "Sequence-Level
Knowledge Distillation", arXiv:1606.07947, §3 (train the student by plain NLL on the teacher's outputs ŷ,
with beam search standing in for the teacher's mode).
Implements two ways to pay for the teacher once instead of at every step:
  - ``cache_teacher_targets``: run the teacher over the training rows once and keep, per position, its k most
    likely tokens and their log-probabilities. ``TeacherTargets.dense(rows)`` rebuilds a full (b, L, V)
    distribution: the top-k probabilities as the teacher gave them and the leftover mass 1 − Σ_top-k p spread
    evenly over the other V − k tokens. This is an approximation of full-vocabulary KD: it keeps every
    divergence finite (renormalising the top k alone would give the other tokens probability 0 and make
    reverse KL and GJSD infinite) and it stores k·(4 + 8) bytes per token instead of 4·V.
  - ``teacher_generations``: continue each prompt with the teacher's own tokens (greedy = Kim & Rush's beam of
    width 1, or sampling) for sequence-level KD.
Glossary: N rows · L tokens per row · k kept tokens per position · V vocabulary · ŷ teacher output.
Left out: beam search (we decode greedily or sample); storing full logits (the trainer takes the live
          teacher instead, which is what the paper-scale run on a GPU does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from effref.models.calls import forward_logits, model_device
from effref.runtime import progress_bar


@dataclass
class TeacherTargets:
    """Top-k teacher log-probabilities for every position of ``N`` training rows of ``L`` tokens."""

    log_probs: torch.Tensor  # (N, L, k) float32, log p of the kept tokens
    indices: torch.Tensor  # (N, L, k) int64, their token ids
    vocab_size: int  # V

    @property
    def k(self) -> int:
        return self.log_probs.shape[-1]

    def dense(self, rows: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """Full log-probabilities (len(rows), L, V): top-k as cached, the remaining mass uniform elsewhere."""
        log_p = self.log_probs[rows].to(device)  # (b, L, k)
        kept = log_p.exp().sum(-1).clamp(max=1 - 1e-6)  # (b, L) Σ of the top-k probabilities
        rest = self.vocab_size - self.k
        tail = torch.log1p(-kept) - math.log(max(rest, 1))  # (b, L) log of each tail token's share
        out = tail[..., None].expand(*log_p.shape[:2], self.vocab_size).clone()  # (b, L, V)
        return out.scatter_(-1, self.indices[rows].to(device), log_p)  # the top-k entries as cached

    def nbytes(self) -> int:
        return self.log_probs.nbytes + self.indices.nbytes


@torch.no_grad()
def cache_teacher_targets(teacher: nn.Module, data: torch.Tensor, k: int = 32, batch_size: int = 8,
                          progress: bool = True) -> TeacherTargets:
    """Run ``teacher`` once over ``data`` (N, L+1) and keep top-k log-probs for its first L positions.

    Row i's targets at position j are the teacher's prediction for token j + 1 given tokens 0..j — the
    positions a student scores when it is trained on ``data[i]`` (inputs data[:, :-1], targets data[:, 1:]).
    """
    if data.ndim != 2 or data.shape[1] < 2 or data.is_floating_point():
        raise ValueError(f"data must be integer token ids (N, L+1) with L+1 >= 2, got {tuple(data.shape)} "
                         f"{data.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be a positive integer such as 32 (tokens kept per position)")
    device = model_device(teacher)
    chunks_lp, chunks_ix, vocab = [], [], None
    was_training = teacher.training
    teacher.eval()
    for start in progress_bar(range(0, len(data), batch_size), desc="teacher targets", disable=not progress):
        logits = forward_logits(teacher, data[start:start + batch_size, :-1].to(device)).float()  # (b, L, V)
        vocab = logits.shape[-1]
        if k > vocab:
            raise ValueError(f"k={k} exceeds the teacher's vocabulary size {vocab}; use a smaller k")
        top = logits.log_softmax(-1).topk(k, dim=-1)  # values, indices (b, L, k)
        chunks_lp.append(top.values.cpu())
        chunks_ix.append(top.indices.cpu())
    teacher.train(was_training)
    return TeacherTargets(torch.cat(chunks_lp), torch.cat(chunks_ix), vocab)


@torch.no_grad()
def teacher_generations(teacher: nn.Module, prompts: torch.Tensor, new_tokens: int, temperature: float = 0.0,
                        top_k: int | None = None, batch_size: int = 8, seed: int = 0,
                        progress: bool = True) -> torch.Tensor:
    """Each prompt (N, P) followed by ``new_tokens`` tokens of the teacher: (N, P + new_tokens).

    ``temperature=0`` decodes greedily (Kim & Rush's beam search with a beam of one); otherwise it samples,
    optionally from the ``top_k`` most likely tokens. The teacher must have our ``generate`` method.
    """
    if prompts.ndim != 2 or prompts.is_floating_point():
        raise ValueError(f"prompts must be integer token ids (N, P), got {tuple(prompts.shape)} {prompts.dtype}")
    if new_tokens < 1:
        raise ValueError(f"new_tokens={new_tokens} must be >= 1")
    if not hasattr(teacher, "generate") or not hasattr(teacher, "new_cache"):
        raise TypeError(f"teacher must be an effref Llama (load_model(..., impl='effref')), "
                        f"got {type(teacher).__name__}")
    device = model_device(teacher)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in progress_bar(range(0, len(prompts), batch_size), desc="teacher text", disable=not progress):
        batch = prompts[start:start + batch_size].to(device)  # (b, P)
        out.append(teacher.generate(batch, new_tokens, temperature=temperature, top_k=top_k,
                                    generator=generator).cpu())  # (b, P + new), no EOS stop
    return torch.cat(out)
