"""PEQA: parameter-efficient fine-tuning of a quantized model by training only its quantization scales.

Paper: Kim, Lee, Kim, Park, Yoo, Kwon, Lee (2023), "Memory-Efficient Fine-Tuning of Compressed Large Language
Models via sub-4-Bit Integer Quantization", arXiv:2305.14152 — §3.1–3.2, Eq. 2–3.
Implements: a linear layer whose weight is kept as b-bit integer codes with group-wise (or per-channel) scale
and zero point, Ŵ = s ⊙ (Q − z) (Eq. 2), starting from round-to-nearest (``effref.quantization.basics``).
The codes Q and the zero points z are frozen buffers; the scales s (one per output channel and group) are
the only trainable tensor (Eq. 3: s₀ + Δs). Backward rebuilds Ŵ from the codes instead of keeping a float
copy: ∂L/∂x = ∂L/∂y · Ŵ and ∂L/∂s_{o,g} = Σ_{i ∈ g} (∂L/∂y)ᵀx |_{o,i} · (Q − z)_{o,i}.
The same layer with frozen scales is the 4-bit base of QA-LoRA (``effref.peft.qa_lora``), which may replace
its integer zero points by float ones when it merges an adapter.
Glossary: Q ``codes`` (packed b-bit) · s ``scale`` (out × G) · z ``zero`` (out × G) · G = in / g groups per
          row · g ``group_size`` (``in_features`` = per-channel, the paper's main setting).
Left out: OPTQ/GPTQ initialisation of the codes (RTN here), 3-bit kernels, the paper's instruction-tuning
          recipes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from effref.checks import config_or_default
from effref.peft.core import freeze_base, linear_targets, replace_all, targets_or_default
from effref.quantization.basics import QuantConfig, pack, quantize, unpack
from effref.runtime import progress_bar


@dataclass(frozen=True)
class PeqaConfig:
    bits: int = 4
    group_size: int | None = None  # None: one scale per output channel (per-channel, the paper's default)
    target_modules: tuple[str, ...] | None = None  # None: every linear of the model's blocks

    def __post_init__(self) -> None:
        QuantConfig(bits=self.bits, group_size=1 if self.group_size is None else self.group_size)  # validates


class _ScaledCodeMatmul(torch.autograd.Function):
    """y = x Ŵᵀ with Ŵ = s ⊙ (Q − z) rebuilt in forward and backward; saves only x (and only if s trains)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, layer: GroupQuantLinear) -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x if scale.requires_grad else None)
        return x @ layer.dequantized_weight().to(x.dtype).T  # (..., in) @ (in, out) -> (..., out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        layer, (x,) = ctx.layer, ctx.saved_tensors
        grad_x = grad_out @ layer.dequantized_weight().to(grad_out.dtype)  # (..., out) @ (out, in)
        grad_scale = None
        if x is not None:
            grad_w = grad_out.reshape(-1, layer.out_features).T.float() @ x.reshape(-1, layer.in_features).float()
            centred = layer.centred_codes()  # (out, in): Q − z
            grad_scale = (grad_w * centred).reshape(layer.out_features, layer.scale.shape[1], -1).sum(-1)  # (out, G)
        return grad_x, grad_scale, None


class GroupQuantLinear(nn.Module):
    """Ŵ = s ⊙ (Q − z) with packed codes and zero points as buffers and the scales as a parameter."""

    def __init__(self, linear: nn.Linear, bits: int = 4, group_size: int | None = None) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"GroupQuantLinear quantizes an nn.Linear, got {type(linear).__name__}")
        group_size = group_size or linear.in_features
        cfg = QuantConfig(bits=bits, granularity="group", group_size=group_size, symmetric=False,
                          scale_dtype=torch.float32)
        cfg.check_input_dim(linear.in_features)  # raises with a suggested divisor
        q = quantize(linear.weight, cfg)  # RTN: codes (out, in), scale and zero (out, G)
        self.in_features, self.out_features, self.bits, self.group_size = (linear.in_features,
                                                                           linear.out_features, bits, group_size)
        self.register_buffer("codes", pack(q.codes, bits))  # (out·in·bits/8,) uint8
        self.register_buffer("zero", q.zero.float())  # (out, G); float so QA-LoRA can merge into it
        self.scale = nn.Parameter(q.scale.float(), requires_grad=False)  # (out, G); PEQA unfreezes it
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def centred_codes(self) -> torch.Tensor:
        """Q − z as float32 (out, in)."""
        codes = unpack(self.codes, self.bits, self.in_features * self.out_features).float()
        codes = codes.reshape(self.out_features, self.in_features)
        return codes - self.zero.repeat_interleave(self.group_size, dim=1)  # z broadcast over each group

    def dequantized_weight(self) -> torch.Tensor:
        """Ŵ = s ⊙ (Q − z), float32 (out, in) (Eq. 2)."""
        scale = self.scale.detach().float().repeat_interleave(self.group_size, dim=1)  # (out, in)
        return scale * self.centred_codes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _ScaledCodeMatmul.apply(x, self.scale, self)  # (..., out)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}")


def peqa_layer(linear: nn.Linear, cfg: PeqaConfig) -> GroupQuantLinear:
    """Quantize ``linear`` (RTN) and make its scales the only trainable tensor."""
    layer = GroupQuantLinear(linear, cfg.bits, cfg.group_size)
    layer.scale.requires_grad_(True)
    return layer


def apply_peqa(model: nn.Module, cfg: PeqaConfig = PeqaConfig(), progress: bool = False) -> nn.Module:
    """Quantize every target linear and train only the scales; everything else is frozen. In place.

    Every layer is quantized before the first one is swapped in, so a failure leaves the model as it was.
    """
    cfg = config_or_default(cfg, PeqaConfig, "PeqaConfig(bits=4)")
    targets = linear_targets(model, targets_or_default(model, cfg.target_modules, "linears"), "PEQA")
    for name, layer in targets.items():  # check every layer before changing any
        group = cfg.group_size or layer.in_features
        if layer.in_features % group:
            raise ValueError(f"group_size={group} does not divide in_features={layer.in_features} of {name}; "
                             "pick a divisor such as 32 or 64, or group_size=None (per channel)")
    quantized = {name: peqa_layer(layer, cfg) for name, layer in
                 progress_bar(targets.items(), desc="PEQA", unit="layer", disable=not progress)}
    freeze_base(model)  # before the swap: the new scales stay trainable
    replace_all(model, quantized)
    return model
