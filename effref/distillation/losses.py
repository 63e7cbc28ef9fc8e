"""Token-level distillation divergences between a teacher and a student, on (B, T, V) logits.

Papers: Hinton, Vinyals, Dean (2015), "Distilling the Knowledge in a Neural Network", arXiv:1503.02531, §2
(soft targets at temperature T, soft-target loss multiplied by T²); Gu, Dong, Wei, Huang (2023), "MiniLLM:
Knowledge Distillation of Large Language Models", arXiv:2306.08543 (reverse KL, the student's distribution
first); Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist, Bachem (2023), "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes" (GKD), arXiv:2306.13649 (generalized Jensen–Shannon divergence).
Implements, per position, with p = softmax(z_t / T) the teacher and q = softmax(z_s / T) the student:
  forward KL   T² · KL(p ‖ q) = T² Σ_v p_v (log p_v − log q_v)          (Hinton: mode-covering)
  reverse KL   T² · KL(q ‖ p) = T² Σ_v q_v (log q_v − log p_v)          (MiniLLM: mode-seeking)
  GJSD(β)      T² · [β KL(p ‖ m) + (1 − β) KL(q ‖ m)],  m = β p + (1 − β) q   (GKD)
then the mean over positions weighted by ``mask``. GKD's convention (checked in tests): GJSD(β) vanishes at
β = 0 and β = 1, GJSD(β)/β → KL(p ‖ q) as β → 0 and GJSD(β)/(1 − β) → KL(q ‖ p) as β → 1, so small β behaves
like forward KL and β near 1 like reverse KL. Hinton scales only the soft-target loss by T² so that its
gradient, which shrinks as 1/T², keeps its size when T changes; we apply the same T² to all three.
Everything is computed from log_softmax in float32 (the mixture m by logsumexp), never from probabilities.
Glossary: z_s, z_t student / teacher logits (B, T, V) · T temperature · β GJSD mixture weight · mask (B, T)
          weights of the positions (1 = scored, 0 = ignored) · V vocabulary size.
Left out: MiniLLM's sequence-level policy-gradient optimisation — here reverse KL is the simpler token-level
          objective on given sequences, kept beside the paper's method (effref.distillation.minillm, objective
          "minillm" of the trainer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def check_vocab(student_vocab: int, teacher_vocab: int) -> None:
    """Raise ValueError unless student and teacher predict over the same vocabulary (white-box KD needs it)."""
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"student vocabulary size {student_vocab} != teacher vocabulary size {teacher_vocab}: logit "
            "distillation compares the two distributions token by token, so build the student with "
            f"vocab_size={teacher_vocab} and the teacher's tokenizer, or use sequence-level KD "
            "(objective='seq_kd'), which needs only the teacher's text")


def _log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the arguments; return log q and log p at temperature T, both float32 (B, T, V)."""
    if not isinstance(temperature, (int, float)) or not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0 (1.0 = the plain "
                         "distributions; Hinton et al. use values such as 2–20)")
    if student_logits.ndim != 3:
        raise ValueError(f"student_logits must have shape (B, T, V), got {tuple(student_logits.shape)}; "
                         "add the missing axes with [None]")
    check_vocab(student_logits.shape[-1], teacher_logits.shape[-1])
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape "
                         f"{tuple(student_logits.shape)}; score the same (B, T) token positions with both models")
    if mask is not None and mask.shape != student_logits.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} != (B, T) = {tuple(student_logits.shape[:2])}; "
                         "pass one weight per scored position")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)  # (B, T, V), no gradient
    return log_q, log_p


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) = Σ_v a_v (log a_v − log b_v) over the last axis: (B, T, V) -> (B, T)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ mask · x / Σ mask over (B, T) positions; the plain mean without a mask."""
    if mask is None:
        return per_position.mean()
    weights = mask.to(per_position.dtype)  # (B, T)
    return (per_position * weights).sum() / weights.sum().clamp_min(1e-12)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
    """Hinton et al.'s soft-target loss T² · KL(p_teacher ‖ q_student), averaged over the masked positions."""
    log_q, log_p = _log_probs(student_logits, teacher_logits, mask, temperature)
    return temperature ** 2 * masked_mean(_kl(log_p, log_q), mask)  # (B, T) -> scalar


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
    """MiniLLM's divergence T² · KL(q_student ‖ p_teacher), averaged over the masked positions."""
    log_q, log_p = _log_probs(student_logits, teacher_logits, mask, temperature)
    return temperature ** 2 * masked_mean(_kl(log_q, log_p), mask)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                    temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """GKD's T² · [β KL(p ‖ m) + (1 − β) KL(q ‖ m)] with m = β p + (1 − β) q, β in [0, 1]."""
    if not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta!r} must lie in [0, 1] (GKD: near 0 behaves like forward KL, near 1 like "
                         "reverse KL; 0.5 is the symmetric Jensen–Shannon divergence)")
    log_q, log_p = _log_probs(student_logits, teacher_logits, mask, temperature)
    log_beta = math.log(beta) if beta > 0 else -math.inf
    log_rest = math.log1p(-beta) if beta < 1 else -math.inf
    log_m = torch.logaddexp(log_p + log_beta, log_q + log_rest)  # (B, T, V): log(β p + (1 − β) q)
    per_position = (beta * _kl(log_p, log_m) if beta > 0 else 0.0) + (
        (1 - beta) * _kl(log_q, log_m) if beta < 1 else 0.0)  # (B, T); a weight of 0 drops its term
    return temperature ** 2 * masked_mean(per_position, mask)


def sequence_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy of ``targets`` (B, T) under ``logits`` (B, T, V), averaged over the mask."""
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must be (B, T, V) "
                         "and (B, T); pass the ids shifted by one (inputs ids[:, :-1], targets ids[:, 1:])")
    if mask is not None and mask.shape != targets.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != targets shape {tuple(targets.shape)}")
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # (B·T,)
    return masked_mean(nll.view_as(targets), mask)


DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "gjsd": generalized_jsd}
