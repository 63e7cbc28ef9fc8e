"""GPT-2's ``Conv1D`` layers as ``nn.Linear`` and back: how GPT-2 meets the techniques written for nn.Linear.

transformers keeps GPT-2's attention and MLP projections (``c_attn``, ``c_proj``, ``c_fc``) as ``Conv1D``: a
linear layer whose weight is stored transposed, (in_features, out_features), computing y = x W + b. Every
technique here reads an ``nn.Linear`` weight, (out_features, in_features). So instead of teaching each one a
second layout:

- ``linear_from_conv1d(model)`` replaces every Conv1D by the ``nn.Linear`` with weight Wᵀ and the same bias:
  the same function (up to the order of floating-point additions), on which quantization, pruning, low-rank
  and LoRA all run;
- ``conv1d_from_linear(model)`` turns those layers back into Conv1D, so that ``save_pretrained`` writes the
  layout ``from_pretrained`` expects (layers a technique replaced, e.g. by a quantized layer, stay as they are).

``conv1d_hint(model)`` is the sentence the techniques add to their error when they meet Conv1D layers.
Left out: GPT-2's own fused-QKV split for per-head methods (``c_attn`` stays one 3·d-wide linear).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class LinearFromConv1D(nn.Linear):
    """An ``nn.Linear`` that was a transformers ``Conv1D`` (``conv1d_from_linear`` turns it back)."""


def linear_from_conv1d(model: nn.Module) -> nn.Module:
    """Replace every ``Conv1D`` of ``model`` by an equivalent ``nn.Linear`` (weight transposed), in place."""
    convs = {name: m for name, m in model.named_modules() if isinstance(m, Conv1D)}
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv1D layers; nothing to convert")
    for name, conv in convs.items():
        linear = LinearFromConv1D(conv.nx, conv.nf, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.T)  # (nf, nx) = (out_features, in_features)
            linear.bias.copy_(conv.bias)
        linear.requires_grad_(conv.weight.requires_grad)
        model.set_submodule(name, linear)
    return model


def conv1d_from_linear(model: nn.Module) -> nn.Module:
    """Turn the layers ``linear_from_conv1d`` made back into ``Conv1D``, in place (for ``save_pretrained``)."""
    linears = {name: m for name, m in model.named_modules() if type(m) is LinearFromConv1D}
    if not linears:
        raise ValueError(f"{type(model).__name__} has no layers made by linear_from_conv1d; nothing to convert")
    for name, linear in linears.items():
        conv = Conv1D(linear.out_features, linear.in_features).to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(linear.weight.T)  # (nx, nf)
            conv.bias.copy_(linear.bias)
        conv.requires_grad_(linear.weight.requires_grad)
        model.set_submodule(name, conv)
    return model


def conv1d_hint(model: nn.Module) -> str:
    """'' for most models; for one with Conv1D layers (GPT-2), what to do about them."""
    if not any(isinstance(m, Conv1D) for m in model.modules()):
        return ""
    return (f"; {type(model).__name__} keeps its projections as transformers Conv1D layers (weight stored "
            "transposed): convert them first with effref.models.conv1d.linear_from_conv1d(model), and back "
            "with conv1d_from_linear(model) before save_pretrained")
