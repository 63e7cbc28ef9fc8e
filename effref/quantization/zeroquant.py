"""ZeroQuant: group-wise weights and token-wise dynamic activations, the W8A8 layer every later method reuses.

Paper: Yao, Aminabadi, Zhang, Wu, Li, He (2022), "ZeroQuant: Efficient and Affordable Post-Training
Quantization for Large-Scale Transformers", arXiv:2206.01861 — §4.1.
Implements: a linear layer whose *weights* are quantized once (symmetric, per tensor / channel / group of
the input dimension) and whose *input activations* are quantized at run time, symmetric absmax, either one
scale for the whole tensor or one per token (row):

    y = Q_a(x) · Q_w(W)ᵀ + b,   Q_a(x)_t = s_t · round(x_t / s_t),   s_t = max_j |x_tj| / (2^(b_a−1) − 1).

Per-token scales cost nothing in the GEMM (they factor out of the sum over input channels, see
kernels/w8a8.py) and follow the large token-to-token range differences of LLM activations, which a single
per-tensor scale cannot. ``WAQuantLinear`` simulates the integer arithmetic in floating point: it computes
exactly what ``kernels.w8a8.w8a8_matmul`` computes for per-channel int8 weights and per-token int8
activations (the tests check this), and it also covers the other granularities and bit widths.
Naive W8A8 (the baseline of the SmoothQuant paper) is the same layer with per-tensor activation scales.
Glossary: b_w, b_a weight / activation bits · s_t per-token scale · g weight group size.
Left out: layer-by-layer knowledge distillation (ZeroQuant-LKD, §4.3) and the fused CUDA kernels. ZeroQuant
partitions the weight matrix into groups of *rows* (Q-BERT's scheme); we group consecutive *inputs* of a
row, the finer scheme GPTQ/AWQ and our W4A16 kernel use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from effref.checks import config_or_default
from effref.quantization.basics import QuantConfig, quantize
from effref.quantization.driver import quantize_model
from effref.quantization.linear import QuantLinear

ACT_GRANULARITIES = ("token", "tensor")


@dataclass
class WAQuantConfig:
    """Weight and activation quantization of one linear layer (defaults: ZeroQuant's W8A8)."""

    w_bits: int = 8
    w_granularity: str = "group"  # "tensor" | "channel" | "group" (of consecutive inputs)
    group_size: int = 64  # divides both of SmolLM2's input widths (576 and 1536)
    a_bits: int = 8
    a_granularity: str = "token"  # "token" (dynamic per row) | "tensor" (dynamic, one scale)

    def __post_init__(self) -> None:
        self.weight_config()  # validates w_bits, w_granularity, group_size
        if isinstance(self.a_bits, bool) or not isinstance(self.a_bits, int) or not 2 <= self.a_bits <= 8:
            raise ValueError(f"a_bits={self.a_bits!r} is not supported; use an integer from 2 to 8")
        if self.a_granularity not in ACT_GRANULARITIES:
            raise ValueError(f"a_granularity={self.a_granularity!r} is not known; use one of {ACT_GRANULARITIES}")

    def weight_config(self) -> QuantConfig:
        return QuantConfig(bits=self.w_bits, granularity=self.w_granularity, group_size=self.group_size,
                           symmetric=True)

    def describe(self) -> str:
        w = self.w_granularity if self.w_granularity != "group" else f"group {self.group_size}"
        return f"W{self.w_bits} ({w}) A{self.a_bits} (per {self.a_granularity}, dynamic)"


def quantize_activations(x: torch.Tensor, bits: int, granularity: str) -> torch.Tensor:
    """Dynamic symmetric fake quantization of x (..., C): one scale per token (row) or for the whole tensor.

    The same numbers as ``basics.fake_quantize`` with a symmetric fp32-scale config (the tests check it),
    written as four tensor operations because it runs on every activation of every forward pass.
    """
    q_max = 2 ** (bits - 1) - 1
    x32 = x.float()
    absmax = x32.abs().amax(dim=-1, keepdim=True) if granularity == "token" else x32.abs().amax()  # (..., 1) or ()
    scale = (absmax / q_max).clamp(min=torch.finfo(torch.float32).tiny)  # s = max|x| / (2^(b−1) − 1)
    return (torch.round(x32 / scale).clamp_(-q_max, q_max) * scale).to(x.dtype)  # s · clamp(round(x / s))


class WAQuantLinear(QuantLinear):
    """A QuantLinear (stored W codes + scales) whose forward also quantizes its input: y = Q_a(x) Ŵᵀ + b.

    The dequantized weight is kept between calls (it is fixed; only the activation scales change), and
    dropped whenever the buffers are loaded or moved.
    """

    _w_hat: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.meta["extra"]
        x_hat = quantize_activations(x, act["a_bits"], act["a_granularity"])  # (..., C)
        if self._w_hat is None or self._w_hat.dtype != x.dtype:
            self._w_hat = self.dequantize_weight().to(x.dtype)  # (out, C)
        bias = getattr(self, "bias", None)
        return F.linear(x_hat, self._w_hat, None if bias is None else bias.to(x.dtype))

    def _apply(self, fn, recurse=True):
        self._w_hat = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._w_hat = None
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        act = self.meta["extra"]
        return f"{super().extra_repr()}, A{act['a_bits']} per {act['a_granularity']}"


def wa_quantize_linear(linear: nn.Linear, cfg: WAQuantConfig) -> WAQuantLinear:
    """Layer-level: quantize ``linear``'s weight once and wrap it with run-time activation quantization."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}; only linear layers can be "
                        "weight-activation quantized")
    if not isinstance(cfg, WAQuantConfig):
        raise TypeError(f"cfg must be a WAQuantConfig, got {type(cfg).__name__}")
    qtensor = quantize(linear.weight.detach(), cfg.weight_config())  # raises if group_size does not divide C
    return WAQuantLinear.from_linear(linear, qtensor, dtype=linear.weight.dtype, a_bits=cfg.a_bits,
                                     a_granularity=cfg.a_granularity)


def wa_quantize_model(model: nn.Module, cfg: WAQuantConfig, block_ids: Sequence[int] | None = None,
                      progress: bool = True) -> nn.Module:
    """Model-level: replace every linear inside the decoder blocks by a WAQuantLinear, in place.

    No calibration data: weights are rounded to nearest, activation scales are computed at run time.
    Embeddings and the LM head stay in full precision, as in the papers.
    """
    return quantize_model(model, lambda name, linear, stats: wa_quantize_linear(linear, cfg),
                          block_ids=block_ids, progress=progress, desc=cfg.describe())


def zeroquant_model(model: nn.Module, cfg: WAQuantConfig | None = None, block_ids: Sequence[int] | None = None,
                    progress: bool = True) -> nn.Module:
    """ZeroQuant W8A8: group-wise symmetric int8 weights, per-token dynamic int8 activations (``cfg`` default)."""
    cfg = config_or_default(cfg, WAQuantConfig, "WAQuantConfig(group_size=64)")
    if cfg.a_granularity != "token":
        raise ValueError(f"cfg.a_granularity={cfg.a_granularity!r}: ZeroQuant quantizes activations per token; "
                         "use wa_quantize_model for other schemes (e.g. the naive per-tensor W8A8)")
    return wa_quantize_model(model, cfg, block_ids, progress)
