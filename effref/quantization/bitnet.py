"""BitNet: a linear layer with 1-bit weights and 8-bit activations, trained from scratch.

Paper: Wang, Ma, Dong, Huang, Wang, Ma, Yang, Wang, Wu, Wei (2023), "BitNet: Scaling 1-bit Transformers
for Large Language Models", arXiv:2310.11453 — §2.1, Eq. 1–11.
Implements BitLinear, which replaces nn.Linear inside the transformer blocks:
    weights     α = mean(W),   W̃ = Sign(W − α) ∈ {−1, +1}  (Sign(0) = −1),   β = ‖W‖₁ / (n·m)    (Eq. 1–3, 12)
    activations x ← LN(x) (a parameter-free LayerNorm, "SubLN"),  γ = ‖x‖∞,
                x̃ = Clip(round(x · Q_b / γ), −Q_b + 1, Q_b − 1),   Q_b = 2^(b−1), b = 8                    (Eq. 4–5)
    output      y = W̃ x̃ · β γ / Q_b                                                                         (Eq. 11)
The weight is trained in full precision ("latent weights") and binarized in every forward; the
straight-through estimator passes gradients through Sign and round as if they were the identity (§2.2).
The paper's ε in the clip keeps codes inside int8; we clip to ±(Q_b − 1) after rounding, which does the same.
At inference a BitLinear stores n·m bits plus β: about 1 bit per weight.
Glossary: W (m × n) latent weight · W̃ binarized weight · α its mean · β its mean |W| · x input · γ its absmax
          · Q_b = 2^(b−1) · b activation bits.
Left out: group quantization and normalization for model parallelism (§2.1), activations before
non-linearities scaled to [0, Q_b], mixed-precision training details (we train in fp32), and the ternary
weights of BitNet b1.58 (a later paper).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from effref.checks import config_or_default
from effref.quantization.driver import quantize_model
from effref.quantization.qat import share_linear
from effref.runtime import progress_bar


@dataclass
class BitNetConfig:
    act_bits: int = 8
    act_granularity: str = "tensor"  # the paper's γ = ‖x‖∞ over the whole tensor; "token" = per row
    layer_norm: bool = True  # SubLN before quantizing the input
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if isinstance(self.act_bits, bool) or not isinstance(self.act_bits, int) or not 2 <= self.act_bits <= 8:
            raise ValueError(f"act_bits={self.act_bits!r} is not supported; use an integer from 2 to 8")
        if self.act_granularity not in ("tensor", "token"):
            raise ValueError(f"act_granularity={self.act_granularity!r} is not known; use 'tensor' or 'token'")


def binarize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W̃, β): signs of W − mean(W) in {−1, +1}, and β = mean |W| (Eq. 1–3, 12)."""
    alpha = w.mean()
    signs = torch.where(w - alpha > 0, 1.0, -1.0).to(w.dtype)  # (m, n)
    return signs, w.abs().mean()


def quantize_input(x: torch.Tensor, cfg: BitNetConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̃ integer codes as floats, γ): absmax quantization of the (normalized) input (Eq. 4–5)."""
    q_b = 2 ** (cfg.act_bits - 1)
    if cfg.act_granularity == "tensor":
        gamma = x.abs().amax().clamp(min=cfg.eps)  # ()
    else:
        gamma = x.abs().amax(dim=-1, keepdim=True).clamp(min=cfg.eps)  # (..., 1)
    codes = torch.clamp(torch.round(x * q_b / gamma), -q_b + 1, q_b - 1)  # (..., n)
    return codes, gamma


class BitLinear(nn.Linear):
    """nn.Linear with BitNet's forward; the float weight is the latent weight that training updates."""

    cfg: BitNetConfig

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: BitNetConfig | None = None) -> BitLinear:
        """Share ``linear``'s parameters (no copy)."""
        module = share_linear(cls, linear)
        module.cfg = BitNetConfig() if cfg is None else cfg
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.layer_norm:
            x = F.layer_norm(x, (self.in_features,), eps=self.cfg.eps)  # SubLN, no affine parameters
        codes, gamma = quantize_input(x, self.cfg)
        signs, beta = binarize_weight(self.weight)
        q_b = 2 ** (self.cfg.act_bits - 1)
        x_q = x + (codes * gamma / q_b - x).detach()  # value x̃·γ/Q_b, gradient of the identity (STE)
        w_q = self.weight + (signs * beta - self.weight).detach()  # value β·W̃, gradient of the identity
        return F.linear(x_q, w_q, self.bias)  # = W̃ x̃ · βγ/Q_b (+ b)

    def inference_nbytes(self) -> int:
        """Storage of the deployed layer: one bit per weight, β in fp16, and the bias if any."""
        bias = 0 if self.bias is None else self.bias.numel() * 2
        return math.ceil(self.weight.numel() / 8) + 2 + bias


def bitnet_model(model: nn.Module, cfg: BitNetConfig | None = None, block_ids: Sequence[int] | None = None,
                 progress: bool = True) -> nn.Module:
    """Model-level: every linear inside the decoder blocks becomes a BitLinear (embeddings and head stay float)."""
    cfg = config_or_default(cfg, BitNetConfig, "BitNetConfig()")
    return quantize_model(model, lambda name, linear, stats: BitLinear.from_linear(linear, cfg),
                          block_ids=block_ids, progress=progress, desc="BitLinear")


def train_language_model(model: nn.Module, ids: torch.Tensor, steps: int, batch_size: int = 16, seq_len: int = 128,
                         lr: float = 3e-3, seed: int = 0, progress: bool = True) -> list[float]:
    """Next-token training from scratch on random windows of ``ids`` (N,) with AdamW and cosine decay; losses.

    The same loop trains the full-precision baseline and the BitNet model, so their curves compare directly.
    BitNet needs a larger learning rate than full precision in the paper (§3); ``lr`` is the caller's choice.
    """
    if steps < 1 or batch_size < 1 or not 2 <= seq_len < len(ids):
        raise ValueError(f"steps={steps}, batch_size={batch_size}, seq_len={seq_len}: need positive steps and "
                         f"batch size, and 2 ≤ seq_len < len(ids)={len(ids)}")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    device = next(model.parameters()).device
    model.train()
    losses = []
    for _ in progress_bar(range(steps), desc="training", disable=not progress):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
        window = ids[starts[:, None] + torch.arange(seq_len + 1)].to(device)  # (B, T + 1)
        logits = model(window[:, :-1])  # (B, T, V)
        logits = logits if isinstance(logits, torch.Tensor) else logits.logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), window[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses
