"""One distillation loop, six objectives: supervised, forward KD, reverse KD, GKD on-policy, MiniLLM, sequence-level KD.

Papers: Hinton et al. (2015) arXiv:1503.02531 (forward KL on soft targets); Gu et al. (2023) MiniLLM
arXiv:2306.08543 (reverse KL); Agarwal et al. (2023) GKD arXiv:2306.13649, Algorithm 1 (with probability λ
the student samples the continuation ŷ ~ q_θ(· | x) itself, the teacher scores every position of it, and the
loss is the divergence on those positions; no gradient flows through the sampling); Kim & Rush (2016)
arXiv:1606.07947 (plain NLL on the teacher's text).
Implements, each step: draw ``batch_size`` rows of ``data`` (N, L) — a row is x (the first ``prompt_len``
tokens) then y — and
  supervised   NLL of the row's own next tokens (the from-scratch baseline; also Distilling step-by-step)
  forward_kl   T² KL(p ‖ q) on every position          (teacher live, or cached TeacherTargets)
  reverse_kl   T² KL(q ‖ p) on every position          (same)
  gkd          with probability λ replace y by the student's own sample, then T² GJSD_β on the y positions
  minillm      every step y ~ α p + (1 − α) q_θ, then MiniLLM's policy-gradient loss on the y positions
               (effref.distillation.minillm: single-step decomposition, importance weights, length norm)
  seq_kd       NLL on the y positions of rows the teacher wrote (targets.teacher_generations)
Every on-policy sample is recorded in ``DistillResult.samples`` (and ``sampler`` may be injected), so a test can
check that the sequences the teacher scored are the student's.
Glossary: x prompt (prompt_len tokens) · y continuation · q student, p teacher · λ ``on_policy`` · β ``beta``
          · T ``temperature`` · b batch size · w per-position weights (``weights`` or the y mask).
Left out: learning-rate schedules, gradient accumulation, mixed precision.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from effref.distillation.losses import DIVERGENCES, check_vocab, sequence_nll
from effref.distillation.minillm import minillm_surrogate, mixed_sample
from effref.distillation.targets import TeacherTargets
from effref.models.calls import forward_logits, model_device
from effref.runtime import progress_bar

OBJECTIVES = ("supervised", "forward_kl", "reverse_kl", "gkd", "minillm", "seq_kd")
Sampler = Callable[[nn.Module, torch.Tensor, int], torch.Tensor]  # (student, x (b, P), n) -> (b, P + n)


@dataclass
class DistillConfig:
    objective: str = "forward_kl"  # one of OBJECTIVES
    steps: int = 30
    lr: float = 3e-3
    batch_size: int = 4  # groups of rows per step
    temperature: float = 1.0  # T of the divergence (T² scaled)
    beta: float = 0.5  # GKD's GJSD mixture weight β
    on_policy: float = 1.0  # GKD's λ: probability that a step trains on the student's own samples
    mix_alpha: float = 0.2  # MiniLLM's α: the teacher's share of the sampling mixture
    length_norm: bool = True  # MiniLLM's length-normalised future reward
    sample_temperature: float = 1.0  # the student's sampling temperature for on-policy steps
    prompt_len: int = 8  # gkd and seq_kd: the first prompt_len tokens of a row are context x, not targets
    group_size: int = 1  # rows drawn together (step-by-step: a problem's label row and its rationale row)
    max_grad_norm: float | None = 1.0
    eval_every: int = 0  # call ``evaluate`` every n steps (0: only before and after training)
    seed: int = 0


@dataclass
class DistillResult:
    student: nn.Module
    losses: list[float]  # training loss per step (units depend on the objective)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, evaluate(student))
    samples: list[torch.Tensor] = field(default_factory=list, repr=False)  # per on-policy step: (b, L - P) y
    teacher_calls: int = 0  # live teacher forward passes
    seconds: float = 0.0  # wall time of the loop, evaluations excluded


def _default_sampler(temperature: float, generator: torch.Generator) -> Sampler:
    def sample(student: nn.Module, prompt: torch.Tensor, n: int) -> torch.Tensor:
        return student.generate(prompt, n, temperature=temperature, generator=generator)  # (b, P + n)
    return sample


def _check(student: nn.Module, teacher, data: torch.Tensor, weights: torch.Tensor | None,
           cfg: DistillConfig, cached: TeacherTargets | None) -> None:
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective={cfg.objective!r} is not known; use one of {OBJECTIVES}")
    if data.ndim != 2 or data.is_floating_point() or data.shape[1] < 2:
        raise ValueError(f"data must be integer token ids (N, L) with L >= 2, got {tuple(data.shape)} {data.dtype}")
    if len(data) % cfg.group_size:
        raise ValueError(f"data has {len(data)} rows, not a multiple of group_size={cfg.group_size}")
    if weights is not None and weights.shape != (data.shape[0], data.shape[1] - 1):
        raise ValueError(f"weights shape {tuple(weights.shape)} != (N, L - 1) = "
                         f"{(data.shape[0], data.shape[1] - 1)}: one weight per predicted position")
    if cfg.steps < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise ValueError(f"steps={cfg.steps}, batch_size={cfg.batch_size}, lr={cfg.lr}: all must be positive")
    if not 0.0 <= cfg.on_policy <= 1.0:
        raise ValueError(f"on_policy={cfg.on_policy} must lie in [0, 1] (GKD's λ: 0 = fixed data, 1 = always "
                         "the student's samples)")
    if not 0.0 <= cfg.mix_alpha <= 1.0:
        raise ValueError(f"mix_alpha={cfg.mix_alpha} must lie in [0, 1] (MiniLLM's teacher share of the sampling "
                         "mixture; the paper uses 0.2)")
    if cfg.objective in ("gkd", "minillm", "seq_kd") and not 1 <= cfg.prompt_len < data.shape[1]:
        raise ValueError(f"prompt_len={cfg.prompt_len} must lie in [1, L - 1] = [1, {data.shape[1] - 1}] so "
                         "that every row keeps some continuation tokens to score")
    needs_teacher = cfg.objective in ("forward_kl", "reverse_kl", "gkd", "minillm")
    if needs_teacher and teacher is None:
        raise ValueError(f"objective={cfg.objective!r} needs a teacher (a model or TeacherTargets); "
                         "use objective='seq_kd' to learn from teacher text alone")
    if not needs_teacher and teacher is not None:
        raise ValueError(f"objective={cfg.objective!r} reads no teacher; pass teacher=None (seq_kd's teacher "
                         "has already written the data: targets.teacher_generations)")
    if isinstance(teacher, TeacherTargets) and cfg.objective == "minillm":
        raise ValueError("MiniLLM samples from a mixture with the teacher and scores fresh samples; pass the "
                         "teacher model, not cached TeacherTargets")
    if isinstance(teacher, TeacherTargets) and cfg.objective == "gkd" and cfg.on_policy > 0:
        raise ValueError("on-policy GKD needs the live teacher to score the student's fresh samples; "
                         "pass the teacher model (and the cache as cached=), or on_policy=0")
    if cached is not None and not isinstance(teacher, nn.Module):
        raise ValueError("cached= serves the off-policy steps of a live teacher; pass the teacher model too")
    for targets in (teacher, cached):
        if isinstance(targets, TeacherTargets) and targets.log_probs.shape[:2] != (data.shape[0], data.shape[1] - 1):
            raise ValueError(f"TeacherTargets cover {tuple(targets.log_probs.shape[:2])} positions but data "
                             f"needs (N, L - 1) = {(data.shape[0], data.shape[1] - 1)}; cache them from this data")
        if targets is not None:
            vocab = targets.vocab_size if isinstance(targets, TeacherTargets) else _vocab(targets)
            check_vocab(_vocab(student), vocab)


def _vocab(model: nn.Module) -> int:
    """Output vocabulary of our Llama (``cfg``) or of a transformers model (``config``)."""
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"{type(model).__name__} has neither .cfg nor .config to read vocab_size from")
    return cfg.vocab_size


def distill(student: nn.Module, teacher: nn.Module | TeacherTargets | None, data: torch.Tensor,
            config: DistillConfig | None = None, weights: torch.Tensor | None = None,
            sampler: Sampler | None = None, evaluate: Callable[[nn.Module], float] | None = None,
            cached: TeacherTargets | None = None, progress: bool = True) -> DistillResult:
    """Train ``student`` in place on rows of ``data`` (N, L) with ``config.objective``; see the module docstring.

    ``teacher`` is a model (live logits), cached ``TeacherTargets`` (forward/reverse KL, off-policy GKD) or
    None (supervised, seq_kd). ``weights`` (N, L - 1) optionally weights each predicted position (default 1;
    gkd and seq_kd zero the prompt positions). ``sampler(student, x, n)`` replaces the student's sampling.
    ``cached`` (with a live teacher) answers the off-policy steps from a cache: only fresh samples cost a
    teacher forward pass.
    """
    cfg = DistillConfig() if config is None else config
    _check(student, teacher, data, weights, cfg, cached)
    device = model_device(student)
    generator = torch.Generator().manual_seed(cfg.seed)
    sample_generator = torch.Generator().manual_seed(cfg.seed + 1)  # MiniLLM's mixture sampling (on the CPU)
    sampler = sampler or _default_sampler(cfg.sample_temperature, torch.Generator(device).manual_seed(cfg.seed))
    N, L = data.shape
    if weights is None:
        weights = torch.ones(N, L - 1)  # (N, L - 1)
        if cfg.objective in ("gkd", "minillm", "seq_kd"):
            weights[:, :cfg.prompt_len - 1] = 0  # position j predicts token j + 1: score only y
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    result = DistillResult(student, [])
    if evaluate is not None:
        result.evals.append((0, evaluate(student)))
    for step in progress_bar(range(1, cfg.steps + 1), desc=cfg.objective, disable=not progress):
        start = time.perf_counter()
        student.train()
        groups = torch.randint(0, N // cfg.group_size, (cfg.batch_size,), generator=generator)  # (b,)
        rows = (groups[:, None] * cfg.group_size + torch.arange(cfg.group_size)).flatten()  # (b · g,)
        ids = data[rows].to(device)  # (b, L)
        w = weights[rows].to(device)  # (b, L - 1)
        on_policy = cfg.objective == "gkd" and torch.rand((), generator=generator).item() < cfg.on_policy
        if on_policy:  # GKD Algorithm 1: y ~ q_θ(· | x), no gradient through the sampling
            ids = sampler(student, ids[:, :cfg.prompt_len], L - cfg.prompt_len)  # (b, L)
            if ids.shape != (len(rows), L):
                raise RuntimeError(f"sampler returned {tuple(ids.shape)}, expected {(len(rows), L)}")
            result.samples.append(ids[:, cfg.prompt_len:].cpu())
        if cfg.objective == "minillm":  # §2.2: y from the teacher-mixed distribution, no gradient through it
            ids, log_mixed = mixed_sample(student, teacher, ids[:, :cfg.prompt_len], L - cfg.prompt_len,
                                          cfg.mix_alpha, sample_generator, cfg.sample_temperature)  # (b, L)
            result.samples.append(ids[:, cfg.prompt_len:].cpu())
            result.teacher_calls += L - cfg.prompt_len
        logits = forward_logits(student, ids[:, :-1])  # (b, L - 1, V)
        if cfg.objective == "minillm":
            with torch.no_grad():
                target = forward_logits(teacher, ids[:, :-1])  # (b, L - 1, V)
            result.teacher_calls += 1
            behaviour = torch.zeros_like(w)  # (b, L - 1): log p̃ of the sampled y; prompt positions unused
            behaviour[:, cfg.prompt_len - 1:] = log_mixed
            loss = minillm_surrogate(logits, target, ids[:, 1:], w, behaviour, cfg.length_norm)
        elif cfg.objective in ("supervised", "seq_kd"):
            loss = sequence_nll(logits, ids[:, 1:], w)
        else:
            cache = teacher if isinstance(teacher, TeacherTargets) else None if on_policy else cached
            if cache is not None:
                target = cache.dense(rows, device)  # (b, L - 1, V) log-probs, valid as logits
            else:
                with torch.no_grad():
                    target = forward_logits(teacher, ids[:, :-1])  # (b, L - 1, V)
                result.teacher_calls += 1
            divergence = DIVERGENCES["gjsd" if cfg.objective == "gkd" else cfg.objective]
            extra = {"beta": cfg.beta} if cfg.objective == "gkd" else {}
            loss = divergence(logits, target, w, temperature=cfg.temperature, **extra)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        result.losses.append(loss.item())
        result.seconds += time.perf_counter() - start
        due = (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps
        if evaluate is not None and due:
            result.evals.append((step, evaluate(student)))
    student.eval()
    return result
