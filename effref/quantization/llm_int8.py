"""LLM.int8(): vector-wise int8 matrix multiplication with a float16 outlier decomposition.

Paper: Dettmers, Lewis, Belkada, Zettlemoyer (2022), arXiv:2208.07339 — §3.1 (vector-wise quantization) and
§3.2 (mixed-precision decomposition, Eq. 6 / Fig. 2).
Implements, for a linear layer y = x Wᵀ with inputs X (n × C) and weight W (R × C):
  outlier columns  O = { j : max_i |X_ij| ≥ α },  α = 6.0, decided per forward pass from the live input;
  Y = X_{:,O} W_{:,O}ᵀ  (float, from float16 copies of those weight columns)
    + (c_x c_wᵀ / 127²) ⊙ (X⁸_{:,¬O} (W⁸_{:,¬O})ᵀ)        (int8 × int8, exact integer accumulation)
  with X⁸ = round(127·X / c_x) per row (token), c_x = max_j∉O |X_ij|, and W⁸ = round(127·W / c_w) per output row.
The int8 weight is stored for every column; float16 copies are kept for the columns that exceeded α during
calibration (the usual outlier dimensions); an outlier column not seen in calibration falls back to the
dequantized int8 column, as bitsandbytes does when it holds no float weights.
Glossary: α threshold · O outlier columns · c_x per-token absmax · c_w per-row absmax · X⁸, W⁸ int8 codes.
Left out: the CUDA int8 GEMM (the integer product is computed exactly in float64 here); int8 training.
"""

from __future__ import annotations

import torch
from torch import nn

from effref.checks import calibration_or_none
from effref.quantization.basics import QuantConfig, quantize
from effref.quantization.driver import LayerInputs, quantize_model
from effref.quantization.linear import QuantLinear

INT8 = QuantConfig(8, "channel", symmetric=True)  # W⁸: absmax per output row, codes in [-127, 127]


def outlier_columns(x: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """Indices of the input columns of ``x`` (..., C) holding any |value| ≥ ``threshold`` (sorted, long)."""
    return (x.reshape(-1, x.shape[-1]).abs() >= threshold).any(0).nonzero()[:, 0]


class Int8Linear(QuantLinear):
    """QuantLinear whose forward is LLM.int8()'s decomposition rather than dequantize-then-matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        threshold = self.meta["extra"]["threshold"]
        x2 = x.reshape(-1, self.in_features).float()  # (n, C)
        q = self.qtensor()
        w8, c_w = q.codes.double(), q.scale.double()  # (R, C) codes, (R, 1) scale = c_w / 127
        cols = outlier_columns(x2, threshold)  # O, decided by the live input
        w_cols = (w8[:, cols] * c_w).float()  # (R, |O|) dequantized fallback
        if hasattr(self, "outlier_cols") and cols.numel():
            stored = {int(c): i for i, c in enumerate(self.outlier_cols.tolist())}
            for k, c in enumerate(cols.tolist()):
                if c in stored:
                    w_cols[:, k] = self.outlier_weight[:, stored[c]].float()  # the float16 copy
        y = x2[:, cols] @ w_cols.T  # (n, R) float part
        rest = x2.clone()
        rest[:, cols] = 0.0  # (n, C) the int8 part never sees the outlier columns
        c_x = rest.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127  # (n, 1)
        x8 = torch.round(rest / c_x).double()  # (n, C) codes in [-127, 127]
        y = y + ((x8 @ w8.T) * c_x.double() * c_w.T).float()  # exact integer product, then rescale
        bias = getattr(self, "bias", None)
        if bias is not None:
            y = y + bias.float()
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def llm_int8_layer(linear: nn.Linear, stats: LayerInputs | None = None, threshold: float = 6.0) -> Int8Linear:
    """Layer-level LLM.int8(): int8 weight + float16 copies of the columns whose calibration |x| reached α."""
    if threshold <= 0:
        raise ValueError(f"threshold={threshold} must be > 0 (the paper uses 6.0)")
    extras = {}
    if stats is not None and stats.abs_max is not None:
        cols = (stats.abs_max >= threshold).nonzero()[:, 0]
        if cols.numel():
            extras = {"outlier_cols": cols, "outlier_weight": linear.weight.detach()[:, cols]}
    return Int8Linear.from_linear(linear, quantize(linear.weight, INT8), threshold=threshold, **extras)


def llm_int8_model(model: nn.Module, calib_batches: torch.Tensor | None = None, threshold: float = 6.0,
                   **driver) -> nn.Module:
    """Model-level LLM.int8(); with ``calib_batches`` (or shared ``stats``) the usual outlier columns get
    float16 weight copies. Returns the model, changed in place.

    ``**driver`` goes to ``quantize_model``: ``target`` (which linears), ``block_ids``, ``batch_size``,
    ``max_samples``, ``seed``, ``progress`` and ``stats`` (shared calibration statistics).
    """
    calib_batches = calibration_or_none(calib_batches, "llm_int8_model")
    needs = ("abs_max",) if calib_batches is not None or driver.get("stats") is not None else ()
    return quantize_model(model, lambda name, linear, stats: llm_int8_layer(linear, stats, threshold),
                          calib_batches, needs=needs, desc="LLM.int8()", **driver)
