"""Quantization (survey §2.1.1): the shared basics, the quantized linear layer and the model-level driver.

Each method lives in its own module (``effref.quantization.gptq``, ``.awq``, ...); this package re-exports
only the shared pieces every method builds on.
"""

from effref.quantization.basics import (
    GRANULARITIES,
    QTensor,
    QuantConfig,
    dequantize,
    fake_quantize,
    pack,
    quantize,
    unpack,
)
from effref.quantization.driver import LayerInputs, collect_statistics, find_blocks, quantize_model
from effref.quantization.io import load_quantized, save_quantized
from effref.quantization.linear import QuantLinear, quantized_linear_bits

__all__ = [
    "GRANULARITIES",
    "LayerInputs",
    "QTensor",
    "QuantConfig",
    "QuantLinear",
    "collect_statistics",
    "dequantize",
    "fake_quantize",
    "find_blocks",
    "load_quantized",
    "pack",
    "quantize",
    "quantize_model",
    "quantized_linear_bits",
    "save_quantized",
    "unpack",
]
