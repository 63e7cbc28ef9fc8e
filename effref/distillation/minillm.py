"""MiniLLM: distillation as minimising the sequence-level reverse KL, optimised by policy gradient.

Paper: Gu, Dong, Wei, Huang (2023), "MiniLLM: Knowledge Distillation of Large Language Models", arXiv:2306.08543 —
§2.1 (the objective and its policy gradient, Eq. 1–2), §2.2 (single-step decomposition, teacher-mixed sampling,
length normalisation).
The objective is θ = argmin KL(q_θ ‖ p) over whole responses y to a prompt x, q_θ the student and p the teacher:
  L(θ) = E_{y∼q_θ} Σ_t −r_t,    r_t = log p(y_t | y_<t, x) − log q_θ(y_t | y_<t, x),   R_t = Σ_{t'≥t} r_t'
whose gradient (the policy-gradient theorem) is ∇L = −E_{y∼q_θ} Σ_t R_t ∇ log q_θ(y_t | y_<t, x). §2.2 makes it
usable:
  single-step decomposition  ∇L = E Σ_t ∇ KL(q_θ(·|y_<t) ‖ p(·|y_<t))  −  E Σ_t R_{t+1} ∇ log q_θ(y_t | y_<t)
                             the first term, the one-step reverse KL, summed over the vocabulary exactly (no
                             sampling noise); only the future reward R_{t+1} is left to the sampled estimate;
  teacher-mixed sampling     y is drawn from p̃ = α p + (1 − α) q_θ (α = 0.2), so the student cannot collapse onto
                             degenerate text the teacher would never write, and each step is reweighted by the
                             per-token importance ratio w_t = q_θ(y_t | y_<t) / p̃(y_t | y_<t) (the paper's
                             approximation of the product over the whole prefix);
  length normalisation       R_{t+1} is replaced by its mean, (1 / (T − t)) Σ_{t'>t} r_t', so long responses do not
                             earn larger rewards than short ones.
``minillm_surrogate`` returns a scalar whose gradient is that estimate; with α = 0 and no length normalisation
its expected gradient equals ∇ KL(q_θ ‖ p) exactly (a test enumerates all sequences of a toy model to check it).
``mixed_sample`` draws the responses. The trainer (effref.distillation.trainer, objective "minillm") combines them.
Glossary: q_θ student, p teacher, p̃ mixture · α ``alpha`` · r_t per-token reward · R_{t+1} future reward ·
          w_t ``importance`` · mask marks the response positions y.
Left out (named simplifications): PPO-style ratio clipping, the language-modelling loss on a pre-training corpus
that the paper adds, the paper's teacher-guided value baseline; sampling recomputes the full prefix each step
(no KV cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effref.models.calls import forward_logits


def minillm_surrogate(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor,
                      mask: torch.Tensor, behaviour_log_probs: torch.Tensor | None = None,
                      normalize_length: bool = True) -> torch.Tensor:
    """The MiniLLM loss for sampled responses: its gradient is the single-step-decomposed policy gradient.

    student_logits, teacher_logits (B, T, V) score positions 0..T−1; ``tokens`` (B, T) are the tokens sampled
    there; ``mask`` (B, T) is 1 on response positions; ``behaviour_log_probs`` (B, T) = log p̃(y_t) of the
    distribution that sampled them (None: the student itself, w_t = 1). Returns the mean over response tokens.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 3:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must both be (B, T, V) over the same positions")
    if tokens.shape != student_logits.shape[:2] or mask.shape != tokens.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} must be (B, T) = "
                         f"{tuple(student_logits.shape[:2])}")
    if behaviour_log_probs is not None and behaviour_log_probs.shape != tokens.shape:
        raise ValueError(f"behaviour_log_probs {tuple(behaviour_log_probs.shape)} must be (B, T) like tokens")
    mask = mask.float()
    log_q = F.log_softmax(student_logits.float(), dim=-1)  # (B, T, V)
    log_p = F.log_softmax(teacher_logits.detach().float(), dim=-1)  # (B, T, V)
    log_q_y = log_q.gather(-1, tokens[..., None])[..., 0]  # (B, T)  log q(y_t)
    reward = ((log_p.gather(-1, tokens[..., None])[..., 0] - log_q_y).detach()) * mask  # (B, T)  r_t
    # R_{t+1} = Σ_{t' > t} r_t': a reversed cumulative sum, shifted by one position
    future = reward.flip(-1).cumsum(-1).flip(-1) - reward  # (B, T)
    if normalize_length:
        remaining = mask.flip(-1).cumsum(-1).flip(-1) - mask  # (B, T)  response tokens after t
        future = future / remaining.clamp(min=1)
    weight = mask if behaviour_log_probs is None else \
        mask * torch.exp(log_q_y.detach() - behaviour_log_probs)  # (B, T)  w_t = q(y_t) / p̃(y_t)
    one_step_kl = (log_q.exp() * (log_q - log_p)).sum(-1)  # (B, T)  KL(q_t ‖ p_t), exact over V
    per_token = one_step_kl - future * log_q_y  # (B, T): gradient = ∇KL_t − R_{t+1} ∇ log q(y_t)
    return (weight * per_token).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def mixed_sample(student: nn.Module, teacher: nn.Module, prompt: torch.Tensor, new_tokens: int,
                 alpha: float = 0.2, generator: torch.Generator | None = None,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``new_tokens`` after ``prompt`` (B, P) from p̃ = α p + (1 − α) q; return ids (B, P + n) and
    log p̃ of each sampled token (B, n)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} must lie in [0, 1] (0: the student alone; the paper uses 0.2)")
    if new_tokens < 1 or temperature <= 0:
        raise ValueError(f"new_tokens={new_tokens} must be ≥ 1 and temperature={temperature} > 0")
    ids, log_mixed = prompt, []
    for _ in range(new_tokens):
        q = F.softmax(forward_logits(student, ids)[:, -1].float() / temperature, dim=-1)  # (B, V)
        p = F.softmax(forward_logits(teacher, ids)[:, -1].float() / temperature, dim=-1)  # (B, V)
        mixed = alpha * p + (1 - alpha) * q  # (B, V)
        nxt = torch.multinomial(mixed.cpu(), 1, generator=generator).to(ids.device)  # (B, 1)
        log_mixed.append(mixed.gather(-1, nxt).log())  # (B, 1)
        ids = torch.cat([ids, nxt], dim=1)
    return ids, torch.cat(log_mixed, dim=1)
