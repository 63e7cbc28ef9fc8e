"""Quantization libraries beside ours on one model: perplexity, bytes as stored, and evaluation time.

Libraries (CPU paths, tried on this machine): bitsandbytes (Dettmers et al. 2022, 2023) ``Linear4bit`` NF4 and
FP4 with double quantization, ``Linear8bitLt`` (LLM.int8, outlier threshold 6); torchao ``quantize_`` with
``Int8WeightOnlyConfig``, ``Int8DynamicActivationInt8WeightConfig`` (W8A8, dynamic per-token activations) and
``IntxWeightOnlyConfig`` (int4, groups of 32). Ours: ``rtn_model`` (W8 per channel, W4 groups of 32),
``quantize_model_nf4`` (QLoRA's NF4 with double quantization), ``llm_int8_model``, ``smoothquant_model`` (W8A8).
Every method quantizes the same layers, the linears of the decoder blocks (not embeddings or head).

Measured per method: perplexity by ``effref.eval.perplexity`` on the same windows, the bytes of the block linears
as stored (``torch.save`` of their state, so a library that keeps int4 codes in int8 containers pays for it), and
the seconds of that evaluation. ``nf4_codes_row`` checks bitsandbytes' NF4 codes against ``effref.peft.qlora``'s
bit for bit. Glossary: W8A8 = 8-bit weights and activations · g32 = groups of 32 input columns.
Left out: torchao's ``Int4WeightOnlyConfig`` and 2:4 sparse kernels (CUDA only), bitsandbytes' CUDA kernels.
"""

from __future__ import annotations

import copy
import importlib.metadata
import io
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from effref.frameworks.sidebyside import Row, guarded, max_diff


@dataclass
class QuantRow:
    """One quantized model: who made it, its perplexity, the bytes of its block linears, evaluation seconds."""

    method: str
    library: str
    family: str  # which methods are comparable: "W8", "W8A8", "LLM.int8", "NF4", "FP4", "W4"
    perplexity: float | None = None
    linear_bytes: int | None = None
    seconds: float | None = None
    status: str = "ok"
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def block_linear_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save`` of the state of every linear inside the decoder blocks (``model.model.layers``)."""
    state = {f"{i}.{name}": m.state_dict() for i, block in enumerate(model.model.layers)
             for name, m in block.named_modules() if _is_block_linear(m)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def _is_block_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or "Linear" in type(module).__name__


def _block_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [(parent, child, lin) for block in model.model.layers for parent in block.modules()
            for child, lin in parent.named_children() if type(lin) is nn.Linear]


def _bnb_swap(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    for parent, child, linear in _block_linears(model):
        setattr(parent, child, make(linear).to("cpu"))  # .to() is where bitsandbytes quantizes
    return model


def bnb_4bit(model: nn.Module, quant_type: str) -> nn.Module:
    import bitsandbytes as bnb

    def make(lin: nn.Linear) -> nn.Module:
        layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True, quant_type=quant_type)
        layer.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type=quant_type,
                                         compress_statistics=True, blocksize=64)
        if lin.bias is not None:
            layer.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        return layer

    return _bnb_swap(model, make)


def bnb_int8(model: nn.Module) -> nn.Module:
    import logging

    import bitsandbytes as bnb

    # LLM.int8 on CPU casts its inputs to fp16 and logs so on every call
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)

    def make(lin: nn.Linear) -> nn.Module:
        layer = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
        if lin.bias is not None:
            layer.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        return layer

    return _bnb_swap(model, make)


def torchao_quantize(model: nn.Module, kind: str) -> nn.Module:
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        quantize_,
    )
    from torchao.quantization.granularity import PerGroup

    configs = {"int8 weight-only": Int8WeightOnlyConfig, "int8 dynamic": Int8DynamicActivationInt8WeightConfig,
               "int4 g32": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))}
    linears = {id(lin) for _, _, lin in _block_linears(model)}
    quantize_(model, configs[kind](), filter_fn=lambda module, fqn: id(module) in linears)
    return model


def ours(model: nn.Module, kind: str, calib: torch.Tensor) -> nn.Module:
    from effref.peft.qlora import quantize_model_nf4
    from effref.quantization import QuantConfig, llm_int8_model, rtn_model, smoothquant_model

    if kind == "rtn w8":
        return rtn_model(model, QuantConfig(bits=8, granularity="channel"), progress=False)
    if kind == "rtn w4 g32":
        return rtn_model(model, QuantConfig(bits=4, group_size=32), progress=False)
    if kind == "nf4":
        return quantize_model_nf4(model)
    if kind == "llm.int8":
        return llm_int8_model(model, calib, progress=False)
    if kind == "smoothquant":
        return smoothquant_model(model, calib, progress=False)
    raise ValueError(f"kind={kind!r} is not known")


# (method, library module, family, quantize(model, calib))
METHODS: tuple[tuple[str, str, str, Callable], ...] = (
    ("bitsandbytes NF4 (double quant)", "bitsandbytes", "NF4", lambda m, c: bnb_4bit(m, "nf4")),
    ("ours NF4 (double quant)", "effref", "NF4", lambda m, c: ours(m, "nf4", c)),
    ("bitsandbytes FP4 (double quant)", "bitsandbytes", "FP4", lambda m, c: bnb_4bit(m, "fp4")),
    ("torchao int4 g32 (Intx)", "torchao", "W4", lambda m, c: torchao_quantize(m, "int4 g32")),
    ("ours RTN W4 g32", "effref", "W4", lambda m, c: ours(m, "rtn w4 g32", c)),
    ("bitsandbytes LLM.int8", "bitsandbytes", "LLM.int8", lambda m, c: bnb_int8(m)),
    ("ours LLM.int8", "effref", "LLM.int8", lambda m, c: ours(m, "llm.int8", c)),
    ("torchao int8 weight-only", "torchao", "W8", lambda m, c: torchao_quantize(m, "int8 weight-only")),
    ("ours RTN W8 per channel", "effref", "W8", lambda m, c: ours(m, "rtn w8", c)),
    ("torchao int8 dynamic (W8A8)", "torchao", "W8A8", lambda m, c: torchao_quantize(m, "int8 dynamic")),
    ("ours SmoothQuant W8A8", "effref", "W8A8", lambda m, c: ours(m, "smoothquant", c)),
)


def quantization_rows(model: nn.Module, ids: torch.Tensor, calib: torch.Tensor, window: int = 256,
                      max_windows: int = 2, methods: tuple = METHODS) -> list[QuantRow]:
    """Every method of ``methods`` on a fresh copy of ``model`` (a transformers LLaMA-shaped causal LM):
    perplexity on ``ids`` (``max_windows`` windows of ``window`` tokens), block-linear bytes, seconds.
    The first row is the unquantized model. A library that fails gives a row with its reason."""
    from effref.eval import perplexity

    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise TypeError(f"model must be a transformers LLaMA-shaped causal LM (model.model.layers), got "
                        f"{type(model).__name__}")

    def measure(name: str, library: str, family: str, m: nn.Module) -> QuantRow:
        start = time.perf_counter()
        ppl = perplexity(m, ids, window=window, max_windows=max_windows, progress=False).ppl
        return QuantRow(name, library, family, ppl, block_linear_bytes(m), time.perf_counter() - start)

    rows = [measure("fp32 (not quantized)", f"torch {torch.__version__}", "fp32", model)]
    for name, library, family, quantize in methods:
        try:
            label = "effref" if library == "effref" else f"{library} {importlib.metadata.version(library)}"
            with torch.no_grad():
                quantized = quantize(copy.deepcopy(model), calib)
            rows.append(measure(name, label, family, quantized))
            del quantized
        except ImportError as exc:
            rows.append(QuantRow(name, library, family, status="unavailable", reason=f"not importable: {exc}"))
        except Exception as exc:  # noqa: BLE001 (a library failing here is a result to show, not a crash)
            rows.append(QuantRow(name, library, family, status="failed",
                                 reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"))
    return rows


def nf4_codes_row(weight: torch.Tensor, block_size: int = 64) -> list[Row]:
    """bitsandbytes' ``quantize_4bit`` (NF4) against ``effref.peft.qlora.quantize_nf4`` on ``weight``: the
    agreement is the share of identical packed code bytes (two codes per byte, the first in the high nibble);
    a second row compares the dequantized weights."""

    def run() -> list[Row]:
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit

        from effref.peft.qlora import dequantize_nf4, quantize_nf4

        version = f"bitsandbytes {importlib.metadata.version('bitsandbytes')}"
        t_lib, (packed, state) = _timed(lambda: quantize_4bit(weight, blocksize=block_size, quant_type="nf4"))
        t_ours, (codes, absmax) = _timed(lambda: quantize_nf4(weight, block_size))
        flat = codes.reshape(-1).to(torch.uint8)
        ours_packed = (flat[0::2] << 4) | flat[1::2]
        same = (ours_packed == packed.reshape(-1)).float().mean().item()
        diff = max_diff(dequantize_nf4(codes, absmax, weight.shape), dequantize_4bit(packed, state))
        return [Row("NF4 codes (quantize_4bit)", version, "effref.peft.qlora.quantize_nf4", "share of equal bytes",
                    same, t_ours / t_lib),
                Row("NF4 dequantized weights", version, "effref.peft.qlora.dequantize_nf4", "max |Δ weight|",
                    diff, None)]

    return guarded("NF4 codes", "bitsandbytes", "effref.peft.qlora.quantize_nf4", "share of equal bytes", run)


def _timed(fn: Callable):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out
