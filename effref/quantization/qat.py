"""Quantization-aware training: the straight-through estimator, and LLM-QAT's data-free distillation.

Papers: Bengio, Léonard, Courville (2013), arXiv:1308.3432 (the straight-through estimator, STE);
Liu, Oguz, Zhao, Chang, Stock, Mehdad, Shi, Krishnamoorthi, Chandra (2023), "LLM-QAT: Data-Free
Quantization Aware Training for Large Language Models", arXiv:2305.17888 — §2.1–2.3.
Implements:
  STE fake quantization. Forward: x̂ = s · (clamp(round(x / s) + z, q_min, q_max) − z), with s, z from the
  detached min/max (or absmax) of each group, optionally shrunk by ``clip_ratio``. Backward: round() is
  treated as the identity and clamp() passes gradients only inside its range, so ∂x̂/∂x = 1 where x falls
  inside the clipping range and 0 outside it.
  LLM-QAT. The quantized student is the model itself with fake-quantized weights (symmetric per channel),
  activations (symmetric per token) and KV cache (per token), and it learns to match the full-precision
  teacher on data *the teacher generates*, so no training set is needed:
    1. data: start from a uniformly random token, take the top-1 token for the first few steps and sample
       from softmax(logits) afterwards (the paper's hybrid sampling, §2.1);
    2. loss: cross-entropy with the teacher's soft labels at every position (§2.3),
         L = −(1/n) Σ_t Σ_v p_T(v | x_<t) log p_S(v | x_<t).
Glossary: s scale · z zero point · b bits · p_T, p_S teacher / student next-token distributions.
Left out: learned step sizes (LSQ-style, s as a parameter) and the paper's 100k generated sequences and
multi-GPU training; we distil on a few hundred sequences (the chapter says how many).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from effref.checks import config_or_default
from effref.models.llama import KVCache, Llama
from effref.quantization.basics import QuantConfig, code_range, find_params
from effref.quantization.driver import quantize_model
from effref.quantization.kv_cache import kv_rows
from effref.runtime import progress_bar


class _RoundSTE(torch.autograd.Function):
    """round() forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def ste_fake_quantize(x: torch.Tensor, cfg: QuantConfig, clip_ratio: float = 1.0) -> torch.Tensor:
    """Fake-quantize x (..., C) with ``cfg`` (rows = leading dims); gradients by the straight-through estimator."""
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio={clip_ratio} must lie in (0, 1]: the fraction of the min/max range kept")
    flat = x.reshape(-1, x.shape[-1])  # (R, C)
    n_rows, n_groups = cfg.groups(*flat.shape)
    grouped = flat.reshape(n_rows, n_groups, -1)  # (R or 1, G, C / G)
    scale, zero = find_params(grouped.detach() * clip_ratio, cfg.bits, cfg.symmetric, cfg.scale_dtype)
    lo, hi = code_range(cfg.bits, cfg.symmetric)
    q = _RoundSTE.apply(grouped.float() / scale)
    if zero is not None:
        q = q + zero
    q = torch.clamp(q, lo, hi)  # zero gradient outside the clipping range
    out = (q - zero) * scale if zero is not None else q * scale
    return out.reshape(x.shape).to(x.dtype)


def share_linear(cls: type[nn.Linear], linear: nn.Linear) -> nn.Linear:
    """A new ``cls`` (an nn.Linear subclass) holding ``linear``'s very weight and bias tensors (no copy)."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    module.in_features, module.out_features = linear.in_features, linear.out_features
    module.weight, module.bias = linear.weight, linear.bias
    return module


class QATLinear(nn.Linear):
    """nn.Linear whose forward fake-quantizes its weight (and optionally its input) with the STE."""

    w_cfg: QuantConfig
    a_cfg: QuantConfig | None

    @classmethod
    def from_linear(cls, linear: nn.Linear, w_cfg: QuantConfig, a_cfg: QuantConfig | None = None) -> QATLinear:
        """Share ``linear``'s parameters (no copy); activations are quantized per token when ``a_cfg`` is given."""
        module = share_linear(cls, linear)
        module.w_cfg, module.a_cfg = w_cfg, a_cfg
        w_cfg.check_input_dim(linear.in_features)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_cfg is not None:
            x = ste_fake_quantize(x, self.a_cfg)  # rows of (..., C) are tokens: per-token scales
        return F.linear(x, ste_fake_quantize(self.weight, self.w_cfg), self.bias)


def prepare_qat(model: nn.Module, w_cfg: QuantConfig, a_cfg: QuantConfig | None = None,
                block_ids: Sequence[int] | None = None, progress: bool = True) -> nn.Module:
    """Model-level: swap every linear inside the decoder blocks for a QATLinear sharing its weights; in place."""
    return quantize_model(model, lambda name, linear, stats: QATLinear.from_linear(linear, w_cfg, a_cfg),
                          block_ids=block_ids, progress=progress, desc="preparing QAT")


class STEKVCache(KVCache):
    """A float cache that fake-quantizes each key and value as it is written (STE), for training with KV quantization."""

    def __init__(self, *args, kv_cfg: QuantConfig, granularity: str = "token", **kwargs):
        super().__init__(*args, **kwargs)
        self.kv_cfg, self.granularity = kv_cfg, granularity

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def fq(x: torch.Tensor) -> torch.Tensor:  # x (B, n_kv, T, d_head)
            rows = ste_fake_quantize(kv_rows(x, self.granularity), self.kv_cfg)
            if self.granularity == "head":
                return rows
            B, n_kv, T, d = x.shape
            return rows.view(B, T, n_kv, d).transpose(1, 2)

        return super().update(layer, fq(k), fq(v))


@dataclass
class LLMQATConfig:
    w_bits: int = 4
    a_bits: int | None = 8  # None: weights only
    kv_bits: int | None = 4  # None: float cache
    n_sequences: int = 128
    seq_len: int = 64
    greedy_tokens: int = 3  # top-1 for the first tokens, then sampling (§2.1)
    steps: int = 100
    batch_size: int = 8
    lr: float = 2e-5  # the paper's learning rate
    seed: int = 0

    def configs(self) -> tuple[QuantConfig, QuantConfig | None, QuantConfig | None]:
        """(weights: symmetric per channel, activations: symmetric per token, KV: asymmetric per token)."""
        w = QuantConfig(bits=self.w_bits, granularity="channel", symmetric=True, scale_dtype=torch.float32)
        a = None if self.a_bits is None else QuantConfig(bits=self.a_bits, granularity="channel", symmetric=True,
                                                          scale_dtype=torch.float32)
        kv = None if self.kv_bits is None else QuantConfig(bits=self.kv_bits, granularity="channel",
                                                           scale_dtype=torch.float16)
        return w, a, kv


@torch.no_grad()
def generate_data(teacher: Llama, n_sequences: int, seq_len: int, greedy_tokens: int = 3, batch_size: int = 16,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The teacher's own text, (n_sequences, seq_len): random first token, top-1 for a few steps, then sampled."""
    if not isinstance(teacher, Llama):
        raise TypeError(f"teacher must be an effref Llama (load_model(..., impl='effref')), got {type(teacher).__name__}")
    if n_sequences < 1 or not 2 <= seq_len <= teacher.cfg.max_seq_len:
        raise ValueError(f"n_sequences={n_sequences}, seq_len={seq_len}: need n_sequences ≥ 1 and "
                         f"2 ≤ seq_len ≤ {teacher.cfg.max_seq_len}")
    teacher.eval()
    out = []
    device = teacher.embed.weight.device
    for start in range(0, n_sequences, batch_size):
        b = min(batch_size, n_sequences - start)
        ids = torch.randint(0, teacher.cfg.vocab_size, (b, 1), generator=generator).to(device)  # (b, 1)
        cache = teacher.new_cache(b, seq_len)
        logits = teacher(ids, cache)[:, -1]  # (b, vocab)
        for step in range(1, seq_len):
            if step <= greedy_tokens:
                token = logits.argmax(-1)  # (b,)
            else:
                probs = logits.float().softmax(-1).cpu()
                token = torch.multinomial(probs, 1, generator=generator)[:, 0].to(device)  # (b,)
            ids = torch.cat([ids, token[:, None]], dim=1)  # (b, step + 1)
            if step < seq_len - 1:
                logits = teacher(token[:, None], cache)[:, -1]
        out.append(ids)
    return torch.cat(out)  # (n_sequences, seq_len)


def student_logits(student: Llama, ids: torch.Tensor, kv_cfg: QuantConfig | None) -> torch.Tensor:
    """Forward of the QAT student; keys and values pass through STE fake quantization when ``kv_cfg`` is given."""
    if kv_cfg is None:
        return student(ids)
    c = student.cfg
    cache = STEKVCache(c.n_layers, ids.shape[0], c.n_kv_heads, c.d_head, ids.shape[1], kv_cfg=kv_cfg,
                       dtype=student.embed.weight.dtype, device=ids.device)
    return student(ids, cache)  # (B, T, vocab)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Soft-label cross-entropy −Σ_v p_T log p_S, averaged over positions (LLM-QAT §2.3)."""
    p_teacher = teacher_logits.float().softmax(-1)  # (B, T, V)
    return -(p_teacher * student_logits.float().log_softmax(-1)).sum(-1).mean()


@dataclass
class LLMQATResult:
    student: Llama
    losses: list[float]
    data: torch.Tensor  # (n_sequences, seq_len) the generated training text


def llm_qat(teacher: Llama, cfg: LLMQATConfig | None = None, data: torch.Tensor | None = None,
            progress: bool = True) -> LLMQATResult:
    """Model-level: distil ``teacher`` into a fake-quantized copy of itself on its own generations.

    ``data`` (n, T) may be passed to reuse generated text; otherwise ``generate_data`` makes it. The
    teacher is not modified. The student's KV quantization is applied inside attention through the cache.
    """
    cfg = config_or_default(cfg, LLMQATConfig, "LLMQATConfig()")
    if not isinstance(teacher, Llama):
        raise TypeError(f"teacher must be an effref Llama (load_model(..., impl='effref')), got {type(teacher).__name__}")
    generator = torch.Generator().manual_seed(cfg.seed)
    if data is None:
        data = generate_data(teacher, cfg.n_sequences, cfg.seq_len, cfg.greedy_tokens, generator=generator)
    w_cfg, a_cfg, kv_cfg = cfg.configs()
    student = prepare_qat(copy.deepcopy(teacher), w_cfg, a_cfg, progress=False).train()
    teacher.eval()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    losses = []
    for _ in progress_bar(range(cfg.steps), desc="LLM-QAT", disable=not progress):
        batch = data[torch.randint(0, len(data), (cfg.batch_size,), generator=generator)]  # (b, T)
        with torch.no_grad():
            target = teacher(batch)  # (b, T, V)
        loss = distillation_loss(student_logits(student, batch, kv_cfg), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return LLMQATResult(student.eval(), losses, data)
