"""Quantization (survey §2.1.1): the shared basics, the quantized linear layer, the model-level driver, and
every method's model-level entry point with its config.

Each method lives in its own module (``effref.quantization.gptq``, ``.awq``, ...), where its layer-level
pieces are; this package re-exports the shared pieces and the calls a user starts from. Those take the model
first, then calibration batches when the method needs them, then the method's config.
"""

from effref.quantization.awq import AWQConfig, awq_model
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
from effref.quantization.bitnet import BitNetConfig, bitnet_model
from effref.quantization.driver import LayerInputs, collect_statistics, find_blocks, quantize_model
from effref.quantization.gptq import GPTQConfig, gptq_model
from effref.quantization.io import load_quantized, save_quantized
from effref.quantization.linear import QuantLinear, quantized_linear_bits
from effref.quantization.llm_int8 import llm_int8_model
from effref.quantization.outlier_suppression import OSPlusConfig, os_plus_model
from effref.quantization.qat import LLMQATConfig, llm_qat
from effref.quantization.quip import QuIPConfig, quip_model
from effref.quantization.rtn import rtn_model
from effref.quantization.smoothquant import SmoothQuantConfig, smooth_model, smoothquant_model
from effref.quantization.spqr import SpQRConfig, spqr_model
from effref.quantization.zeroquant import WAQuantConfig, wa_quantize_model, zeroquant_model

__all__ = [
    "awq_model",
    "AWQConfig",
    "bitnet_model",
    "BitNetConfig",
    "collect_statistics",
    "dequantize",
    "fake_quantize",
    "find_blocks",
    "gptq_model",
    "GPTQConfig",
    "GRANULARITIES",
    "LayerInputs",
    "llm_int8_model",
    "llm_qat",
    "LLMQATConfig",
    "load_quantized",
    "os_plus_model",
    "OSPlusConfig",
    "pack",
    "QTensor",
    "QuantConfig",
    "quantize",
    "quantize_model",
    "quantized_linear_bits",
    "QuantLinear",
    "quip_model",
    "QuIPConfig",
    "rtn_model",
    "save_quantized",
    "smooth_model",
    "smoothquant_model",
    "SmoothQuantConfig",
    "spqr_model",
    "SpQRConfig",
    "unpack",
    "wa_quantize_model",
    "WAQuantConfig",
    "zeroquant_model",
]
