"""The model-level driver every post-training quantization method plugs a layer function into.

Paper: the block-by-block calibration loop of GPTQ (Frantar et al., 2023, arXiv:2210.17323, §4), used the same
way by AWQ, SpQR, QuIP, SmoothQuant and the rest.
Implements: quantization's view of the calibration walk shared with pruning and low-rank methods
(``effref.compression.calibration.walk_linears``): each target linear of each decoder block, in block order, is
handed with the statistics of its inputs to a layer function, and the module (or QTensor, wrapped in a
QuantLinear) it returns is swapped in. Later blocks are calibrated on what the quantized blocks really produce
(GPTQ's sequential scheme). This file only adds what quantization needs on top: the replacement contract, and
errors for targets the walk cannot quantize.
Glossary: X a linear's input rows (n × C) · H = XᵀX / n (GPTQ's Hessian up to a factor 2/n) · block = decoder layer.
Left out: GPTQ's "true sequential" order inside a block; offloading blocks to save accelerator memory.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from torch import nn

from effref.compression.calibration import STATS, InputStats, collect_input_stats, find_blocks, map_linears
from effref.quantization.basics import QTensor, QuantConfig
from effref.quantization.linear import QuantLinear

LayerInputs = InputStats  # the statistics a quantization layer function receives (name kept for readability)
LayerFn = Callable[[str, nn.Linear, "LayerInputs | None"], "nn.Module | QTensor"]

__all__ = [
    "STATS",
    "LayerFn",
    "LayerInputs",
    "check_layer_function",
    "collect_statistics",
    "default_target",
    "find_blocks",
    "quantize_model",
]


def default_target(name: str, module: nn.Module) -> bool:
    """Every nn.Linear inside a decoder block (embeddings and lm_head sit outside the blocks)."""
    return isinstance(module, nn.Linear)


def _check_target(model: nn.Module, target: Callable[[str, nn.Module], bool]) -> None:
    """Refuse selections the walk would silently skip: non-linear modules, and linears outside the blocks."""
    prefix, _ = find_blocks(model)
    for name, module in model.named_modules():
        if module is model or not target(name, module):
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(f"target selected {name} ({type(module).__name__}); only nn.Linear modules can be "
                            "quantized by this driver — narrow target= to linear layers")
        inside = name.startswith(prefix + ".") and name[len(prefix) + 1:].split(".")[0].isdigit()
        if not inside and target is not default_target:  # lm_head and friends are skipped by default
            raise ValueError(f"target selected {name}, which is outside the decoder blocks ({prefix}); "
                             "the driver only quantizes linears inside blocks")


def quantize_model(model: nn.Module, method_fn: LayerFn, calib_batches: torch.Tensor | None = None,
                   target: Callable[[str, nn.Module], bool] = default_target, needs: Collection[str] = (),
                   block_ids: Sequence[int] | None = None, batch_size: int = 4, max_samples: int = 512,
                   seed: int = 0, progress: bool = True, desc: str = "quantizing",
                   stats: Mapping[str, LayerInputs] | None = None,
                   check: Callable[[str, nn.Linear], None] | None = None) -> nn.Module:
    """Quantize ``model``'s target linears in place, block by block, with ``method_fn``; return the model.

    ``method_fn(name, linear, stats)`` returns the replacement module (or a QTensor); ``stats`` is a
    :class:`LayerInputs` with the statistics listed in ``needs`` (a subset of ``STATS``), or None when
    ``needs`` is empty, in which case no calibration forward runs at all. ``calib_batches`` (n, T) token ids
    are required when ``needs`` is not empty. ``target(name, module)`` selects modules (names relative to the
    model); selected modules must be ``nn.Linear`` inside the decoder blocks. ``block_ids`` restricts the
    work to some blocks (the rest keep full precision); ``max_samples`` caps the rows kept for "samples".
    ``stats`` (from :func:`collect_statistics`) replaces calibration: no forward pass runs, and every block
    uses statistics of the full-precision model (non-sequential, but shareable between methods).
    ``check(name, linear)`` runs on every target linear before anything changes (e.g. that a group size
    divides its input dimension), so a refused layer leaves the whole model as it was.
    """
    _check_target(model, target)

    def replace(name: str, linear: nn.Linear, layer_stats: LayerInputs | None) -> nn.Module:
        new = method_fn(name, linear, layer_stats)
        if isinstance(new, QTensor):
            new = QuantLinear.from_linear(linear, new)
        if not isinstance(new, nn.Module):
            raise TypeError(f"method_fn returned {type(new).__name__} for {name}; return an nn.Module or a QTensor")
        return new

    return map_linears(model, replace, needs, calib_batches, dict(stats) if stats is not None else None,
                       target=target, block_ids=block_ids, batch_size=batch_size, max_samples=max_samples,
                       seed=seed, progress=progress, desc=desc, check=check)


def group_check(quant: QuantConfig) -> Callable[[str, nn.Linear], None]:
    """A ``check`` for :func:`quantize_model`: ``quant``'s group size must divide every layer's input dim."""
    def check(name: str, linear: nn.Linear) -> None:
        try:
            quant.check_input_dim(linear.in_features)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return check


def check_layer_function(w: torch.Tensor, w_new: torch.Tensor, what: str, hessian: torch.Tensor | None = None,
                         tolerance: float = 1e-6) -> None:
    """Refuse a rewrite of a layer's weight that should compute the same function but does not.

    The error is relative: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), i.e. ||X ΔWᵀ||² / ||X Wᵀ||² on calibration inputs with
    H = XᵀX / n; with ``hessian=None``, ||ΔW||² / ||W||², which bounds the output change for every input.
    """
    w, delta = w.detach().double(), w_new.detach().double() - w.detach().double()
    h = torch.eye(w.shape[1], dtype=torch.float64, device=w.device) if hessian is None else hessian.double()
    change = ((delta @ h * delta).sum() / (w @ h * w).sum().clamp(min=1e-30)).item()
    if not change <= tolerance:  # also catches NaN
        raise ValueError(f"{what} changed the layer's function by {change:.2e} (relative squared error, "
                         f"allowed {tolerance:.0e}) before rounding; refused before anything changed")


def collect_statistics(model: nn.Module, calib_batches: torch.Tensor,
                       needs: Collection[str] = ("hessian", "abs_max", "abs_mean", "min", "max"),
                       target: Callable[[str, nn.Module], bool] = default_target,
                       **walk) -> dict[str, LayerInputs]:
    """Input statistics of every target linear of the *full-precision* model, keyed by module name.

    One dense calibration pass, shareable by several methods through ``quantize_model(..., stats=...)``.
    """
    _check_target(model, target)
    return collect_input_stats(model, calib_batches, needs, target=target, **walk)
