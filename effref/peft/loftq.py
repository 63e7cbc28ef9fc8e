"""LoftQ: initialise the LoRA matrices so that the quantized base plus the adapter approximates W.

Paper: Li, Yu, Liang, He, Karampatziakis, Chen, Zhao (2023), "LoftQ: LoRA-Fine-Tuning-Aware Quantization for
Large Language Models", arXiv:2310.08659 — §3, Algorithm 1, Eq. 5–7.
Implements: QLoRA starts from Q(W) + 0 (B = 0), so fine-tuning begins with the whole quantization error.
LoftQ alternates, for t = 1 … T, starting from A₀B₀ = 0,

    Q_t = q_N(W − A_{t−1}B_{t−1}),                 (Eq. 6: quantize what the adapter does not carry)
    A_t B_t = SVD_r(W − Q_t),                     (Eq. 7: best rank-r fit of the quantization residual)

and fine-tunes LoRA from (Q_T, A_T, B_T), minimising ‖W − Q − AB‖_F. Here q_N is NF4 with double quantization
(``effref.peft.qlora``) and the rank-r factors of U Σ Vᵀ are split evenly: B = U_r √Σ_r, A = √Σ_r V_rᵀ
(divided by √(α/r), so that LoRA's (α/r)·BA equals the fitted product).
Glossary: W weight (d × k) · Q_t quantized weight · A_t B_t the rank-r product (our B ``lora_B`` is d × r,
          A ``lora_A`` is r × k; the paper writes A Bᵀ) · T ``iterations`` · r rank · α ``alpha``.
Left out: the uniform-quantizer variant, the paper's per-task hyper-parameters; the residual after the last
          iteration is not re-quantized (Algorithm 1 stops at Q_T, A_T, B_T too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from effref.checks import config_or_default
from effref.peft.core import freeze_base, linear_targets, replace_all
from effref.peft.lora import LoraConfig, LoraLinear, lora_targets
from effref.peft.qlora import NF4Config, NF4Linear, fake_quantize_nf4
from effref.runtime import progress_bar


@dataclass(frozen=True)
class LoftQConfig:
    iterations: int = 5  # T (the paper reports T = 1 and T = 5)
    nf4: NF4Config = field(default_factory=NF4Config)

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations={self.iterations!r} must be an integer >= 1 (the paper uses 1 or 5)")


def loftq_decompose(w: torch.Tensor, r: int, cfg: LoftQConfig = LoftQConfig()
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """Algorithm 1 on one weight: (what was quantized last, A (r, k), B (d, r), errors ‖W − Q_t − B_tA_t‖_F).

    The first value is W − B_{T−1}A_{T−1}; NF4-quantizing it gives Q_T. ``errors[t-1]`` is the Frobenius error
    after iteration t; it is the same as QLoRA's ‖W − Q(W)‖_F only before the first SVD.
    """
    if w.ndim != 2:
        raise ValueError(f"w must be a 2-D weight (out, in), got shape {tuple(w.shape)}")
    if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= min(w.shape):
        raise ValueError(f"r={r!r} must satisfy 0 < r <= min{tuple(w.shape)} = {min(w.shape)}")
    w = w.detach().float()
    a = w.new_zeros(r, w.shape[1])  # A₀ = 0, (r, k)
    b = w.new_zeros(w.shape[0], r)  # B₀ = 0, (d, r)
    errors = []
    for _ in range(cfg.iterations):
        target = w - b @ a  # W − B_{t−1}A_{t−1}, (d, k)
        q = fake_quantize_nf4(target, cfg.nf4)  # Q_t (Eq. 6)
        u, sigma, vh = torch.linalg.svd(w - q, full_matrices=False)  # (d, m), (m,), (m, k)
        root = sigma[:r].sqrt()  # split Σ_r evenly between the two factors (Eq. 7)
        b, a = u[:, :r] * root, root[:, None] * vh[:r]  # (d, r), (r, k)
        errors.append(float(torch.linalg.matrix_norm(w - q - b @ a)))
    return target, a, b, errors


def loftq_layer(linear: nn.Linear, lora_cfg: LoraConfig, cfg: LoftQConfig = LoftQConfig()
                ) -> tuple[LoraLinear, list[float]]:
    """A ``LoraLinear`` around an ``NF4Linear`` holding Q_T, with A and B set by LoftQ; also the errors."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"LoftQ initialises an nn.Linear, got {type(linear).__name__}")
    residual, a, b, errors = loftq_decompose(linear.weight, lora_cfg.r, cfg)
    carrier = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    carrier.weight = nn.Parameter(residual, requires_grad=False)  # the tensor NF4Linear quantizes into Q_T
    carrier.bias = linear.bias
    layer = LoraLinear(NF4Linear(carrier, cfg.nf4), lora_cfg.r, lora_cfg.alpha, lora_cfg.dropout)
    with torch.no_grad():
        unscale = 1 / math.sqrt(layer.scaling)  # so that (α/r)·B A = B_T A_T
        layer.lora_A.weight.copy_(a * unscale)
        layer.lora_B.weight.copy_(b * unscale)
    return layer, errors


def apply_loftq(model: nn.Module, lora_cfg: LoraConfig, cfg: LoftQConfig = LoftQConfig(),
                progress: bool = False) -> dict[str, list[float]]:
    """Replace every ``lora_cfg.target_modules`` linear by NF4 + LoftQ-initialised LoRA; freeze the rest.

    Returns {layer name: errors per iteration}. The model is modified in place, once every new layer is built
    (a failure leaves it as it was).
    """
    lora_cfg = config_or_default(lora_cfg, LoraConfig, "LoraConfig(r=8, alpha=16)")
    cfg = config_or_default(cfg, LoftQConfig, "LoftQConfig(iterations=5)")
    targets = linear_targets(model, lora_targets(model, lora_cfg), "LoftQ")
    for name, layer in targets.items():  # check every layer before changing any
        if lora_cfg.r > min(layer.in_features, layer.out_features):
            raise ValueError(f"r={lora_cfg.r} exceeds min(in_features, out_features) = "
                             f"{min(layer.in_features, layer.out_features)} of {name}; pick r <= that")
        if layer.weight.numel() % cfg.nf4.block_size:
            raise ValueError(f"block_size={cfg.nf4.block_size} does not divide the {tuple(layer.weight.shape)} "
                             f"weight of {name}; pick a divisor of its size such as 64")
    new, errors = {}, {}
    for name, layer in progress_bar(targets.items(), desc="LoftQ", unit="layer", disable=not progress):
        new[name], errors[name] = loftq_layer(layer, lora_cfg, cfg)
    freeze_base(model)  # before the swap: the new adapters stay trainable
    replace_all(model, new)
    return errors
