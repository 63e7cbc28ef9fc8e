"""Round-to-nearest (RTN) weight quantization: the baseline every other method is measured against.

Paper: the survey's Eq. 1 (Wan et al., 2024, §2.1.1); used as the "RTN" baseline of GPTQ (Frantar et al., 2023,
arXiv:2210.17323) and AWQ (Lin et al., 2024, arXiv:2306.00978).
Implements: each weight on its own, Ŵ = s·(clamp(round(W / s) + z) - z) with per-tensor, per-channel or per-group
statistics (effref.quantization.basics); no calibration data, no error compensation.
Glossary: W weight (d_out × d_in) · s scale · z zero point · g group size.
Left out: nothing beyond basics; clipping search is AWQ's (awq.py).
"""

from __future__ import annotations

from torch import nn

from effref.checks import config_or_default
from effref.quantization.basics import QuantConfig, quantize
from effref.quantization.driver import LayerInputs, group_check, quantize_model
from effref.quantization.linear import QuantLinear


def rtn_layer(linear: nn.Linear, stats: LayerInputs | None = None, cfg: QuantConfig | None = None) -> QuantLinear:
    """Layer-level RTN: ``linear`` with its weight rounded to the nearest grid point (``stats`` is unused)."""
    cfg = config_or_default(cfg, QuantConfig, "QuantConfig(bits=4, group_size=128)")
    return QuantLinear.from_linear(linear, quantize(linear.weight, cfg))


def rtn_model(model: nn.Module, cfg: QuantConfig | None = None, **driver) -> nn.Module:
    """Model-level RTN: every linear of every decoder block, no calibration; returns the model, in place.

    ``**driver`` goes to ``quantize_model``: ``target`` (which linears), ``block_ids``, ``batch_size``,
    ``max_samples``, ``seed``, ``progress``.
    """
    cfg = config_or_default(cfg, QuantConfig, "QuantConfig(bits=4, group_size=128)")
    return quantize_model(model, lambda name, linear, stats: rtn_layer(linear, stats, cfg), desc="RTN",
                          check=group_check(cfg), **driver)
