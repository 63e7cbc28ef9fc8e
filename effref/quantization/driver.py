"""The model-level driver every post-training quantization method plugs a layer function into.

Paper: the block-by-block calibration loop of GPTQ (Frantar et al., 2023, arXiv:2210.17323, §4 and its
reference code), used the same way by AWQ, SpQR, QuIP, SmoothQuant and the rest.
Implements: find the decoder's blocks (a ``nn.ModuleList``: transformers' ``model.model.layers`` or our
``Llama.blocks``), capture what block 0 receives for each calibration batch, then for each block i:
  1. run the block on its inputs with forward hooks on its target linears, accumulating what the method
     needs of each linear's input X (n tokens × C): H = XᵀX / n, per-channel max|x|, mean|x|, min, max, and a
     seeded subsample of rows;
  2. call the layer function on each target linear and swap in the module it returns (a QTensor is wrapped
     in a QuantLinear);
  3. run the now-quantized block again: its outputs are block i+1's inputs, so later blocks are calibrated
     on the activations the quantized model really produces (GPTQ's sequential scheme).
Linears that read the same tensor (q/k/v, gate/up) share one statistics object, computed once.
Glossary: X a linear's input rows (n × C) · H = XᵀX / n (GPTQ's Hessian up to a factor 2/n) · block = decoder layer.
Left out: GPTQ's "true sequential" order inside a block (all linears of a block see the block's original
inputs); multi-GPU offloading of blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from effref.quantization.basics import QTensor
from effref.runtime import progress_bar

STATS = ("hessian", "abs_max", "abs_mean", "min", "max", "samples")


@dataclass
class LayerInputs:
    """Statistics of the inputs X (n × C) one linear saw during calibration (only those a method asked for)."""

    n_tokens: int = 0
    hessian: torch.Tensor | None = None  # (C, C) XᵀX / n, float32
    abs_max: torch.Tensor | None = None  # (C,) max |x| per input channel
    abs_mean: torch.Tensor | None = None  # (C,) mean |x| per input channel
    min: torch.Tensor | None = None  # (C,)
    max: torch.Tensor | None = None  # (C,)
    samples: torch.Tensor | None = None  # (m, C) rows of X, at most max_samples, seeded choice

    def update(self, x: torch.Tensor, needs: Collection[str], keep: int, generator: torch.Generator) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (n, C)
        n_old, n = self.n_tokens, x.shape[0]
        self.n_tokens += n

        def mix(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:  # running mean over all rows
            return new if old is None else old * (n_old / self.n_tokens) + new * (n / self.n_tokens)

        if "hessian" in needs:
            self.hessian = mix(self.hessian, x.T @ x / n)  # (C, C)
        if "abs_mean" in needs:
            self.abs_mean = mix(self.abs_mean, x.abs().mean(0))
        for name, value, pick in (("abs_max", x.abs().amax(0), torch.maximum), ("min", x.amin(0), torch.minimum),
                                  ("max", x.amax(0), torch.maximum)):
            if name in needs:
                old = getattr(self, name)
                setattr(self, name, value if old is None else pick(old, value))
        if "samples" in needs and keep > 0:
            rows = x[torch.randperm(n, generator=generator)[:keep].to(x.device)]  # (≤ keep, C)
            self.samples = rows if self.samples is None else torch.cat([self.samples, rows])


LayerFn = Callable[[str, nn.Linear, "LayerInputs | None"], "nn.Module | QTensor"]


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of blocks: the ``nn.ModuleList`` with the most members that contain linears."""
    best, best_len = None, 0
    for module in model.modules():
        if (isinstance(module, nn.ModuleList) and len(module) > best_len
                and all(any(isinstance(m, nn.Linear) for m in block.modules()) for block in module)):
            best, best_len = module, len(module)
    if best is None:
        raise ValueError(f"found no nn.ModuleList of blocks with linear layers in {type(model).__name__}; "
                         "pass blocks= explicitly")
    return best


def default_target(name: str, module: nn.Module) -> bool:
    """Every nn.Linear inside a decoder block (embeddings and lm_head sit outside the blocks)."""
    return isinstance(module, nn.Linear)


class _Captured(Exception):
    """Raised by the block-0 hook to stop the forward pass once block 0's inputs are recorded."""


def _capture_block_inputs(model: nn.Module, block: nn.Module, batches: torch.Tensor,
                          batch_size: int) -> list[tuple[tuple, dict]]:
    records: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        records.append((args, kwargs))
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    is_hf = hasattr(model, "config") and not hasattr(model, "cfg")
    try:
        for start in range(0, batches.shape[0], batch_size):
            chunk = batches[start:start + batch_size]  # (b, T)
            try:
                model(chunk, use_cache=False) if is_hf else model(chunk)
            except _Captured:
                pass
    finally:
        handle.remove()
    return records


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _replace(block: nn.Module, name: str, full: str, linear: nn.Linear, method_fn: LayerFn,
             stats: LayerInputs | None) -> None:
    from effref.quantization.linear import QuantLinear

    new = method_fn(full, linear, stats)
    if isinstance(new, QTensor):
        new = QuantLinear.from_linear(linear, new)
    if not isinstance(new, nn.Module):
        raise TypeError(f"method_fn returned {type(new).__name__} for {full}; return an nn.Module or a QTensor")
    _set_module(block, name, new)


@torch.no_grad()
def quantize_model(model: nn.Module, method_fn: LayerFn, calib_batches: torch.Tensor | None = None,
                   target: Callable[[str, nn.Module], bool] = default_target, needs: Collection[str] = (),
                   block_ids: Sequence[int] | None = None, batch_size: int = 4, max_samples: int = 512,
                   seed: int = 0, progress: bool = True, desc: str = "quantizing",
                   stats: Mapping[str, LayerInputs] | None = None) -> nn.Module:
    """Quantize ``model``'s target linears in place, block by block, with ``method_fn``; return the model.

    ``method_fn(name, linear, stats)`` returns the replacement module (or a QTensor); ``stats`` is a
    :class:`LayerInputs` with the statistics listed in ``needs`` (a subset of ``STATS``), or None when
    ``needs`` is empty, in which case no calibration forward runs at all. ``calib_batches`` (n, T) token ids
    are required when ``needs`` is not empty. ``target(name, module)`` selects modules (names relative to the
    model); selected modules must be ``nn.Linear`` inside the decoder blocks. ``block_ids`` restricts the
    work to some blocks (the rest keep full precision); ``max_samples`` caps the rows kept for "samples".
    ``stats`` (from :func:`collect_statistics`) replaces calibration: no forward pass runs, and every block
    uses statistics of the full-precision model (non-sequential, but shareable between methods).
    """
    unknown = set(needs) - set(STATS)
    if unknown:
        raise ValueError(f"needs={sorted(unknown)} are not known statistics; use a subset of {STATS}")
    if needs and calib_batches is None and stats is None:
        raise ValueError(f"this method needs calibration data ({', '.join(sorted(needs))}) but calib_batches=None;"
                         " pass calib_batches=calibration_batches(ids, n, seq_len)")
    if calib_batches is not None and (not isinstance(calib_batches, torch.Tensor) or calib_batches.ndim != 2
                                      or calib_batches.is_floating_point()):
        raise ValueError("calib_batches must be a (n, T) tensor of token ids, got "
                         f"{getattr(calib_batches, 'shape', type(calib_batches).__name__)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be ≥ 1")
    blocks = find_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    chosen = list(range(len(blocks))) if block_ids is None else sorted(set(block_ids))
    if any(not 0 <= i < len(blocks) for i in chosen):
        raise ValueError(f"block_ids={list(block_ids)} out of range; the model has {len(blocks)} blocks")
    plan: dict[int, list[tuple[str, nn.Linear]]] = {}
    for name, module in model.named_modules():
        if module is model or not target(name, module):
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(f"target selected {name} ({type(module).__name__}); only nn.Linear modules can be "
                            "quantized by this driver — narrow target= to linear layers")
        inside = name.startswith(prefix + ".") and name[len(prefix) + 1:].split(".")[0].isdigit()
        if not inside:
            if target is default_target:
                continue  # lm_head and friends are skipped by default
            raise ValueError(f"target selected {name}, which is outside the decoder blocks ({prefix}); "
                             "the driver only quantizes linears inside blocks")
        index = int(name[len(prefix) + 1:].split(".")[0])
        if index in chosen:
            plan.setdefault(index, []).append((name[len(prefix) + 1 + len(str(index)) + 1:], module))
    if not plan:
        raise ValueError("target= selected no nn.Linear inside the chosen blocks; nothing to quantize")
    bar = progress_bar(total=sum(len(v) for v in plan.values()), desc=desc, disable=not progress)
    records = None
    if needs and stats is None:
        device = next(model.parameters()).device
        records = _capture_block_inputs(model, blocks[0], calib_batches.to(device), batch_size)
        keep = -(-max_samples // calib_batches.shape[0])  # rows kept per sequence
        generator = torch.Generator().manual_seed(seed)
    for i in range(max(plan) + 1):
        block = blocks[i]
        if i in plan and records is not None:
            found = _collect(block, plan[i], records, needs, keep, batch_size, generator)
        for name, linear in plan.get(i, []):
            full = f"{prefix}.{i}.{name}"
            if records is not None:
                layer_stats = found[name]
            elif needs and stats is not None:
                layer_stats = stats.get(full)
                missing = [k for k in needs if layer_stats is None or getattr(layer_stats, k) is None]
                if missing:
                    raise ValueError(f"stats has no {missing} for {full}; collect them with "
                                     f"collect_statistics(model, calib_batches, needs={tuple(needs)}) first")
            else:
                layer_stats = None
            _replace(block, name, full, linear, method_fn, layer_stats)
            bar.update(1)
            bar.set_postfix(block=i)
        if records is not None and i < max(plan):  # the quantized block's outputs feed block i + 1
            records = [((_hidden(block(*args, **kwargs)),) + tuple(args[1:]), kwargs) for args, kwargs in records]
    bar.close()
    return model


def collect_statistics(model: nn.Module, calib_batches: torch.Tensor, needs: Collection[str] = STATS[:-1],
                       **driver) -> dict[str, LayerInputs]:
    """Input statistics of every target linear of the *full-precision* model, keyed by module name.

    One calibration pass, shareable by several methods through ``quantize_model(..., stats=...)``: the
    driver walks the blocks as usual, but hands every linear back unchanged.
    """
    found: dict[str, LayerInputs] = {}

    def keep(name: str, linear: nn.Linear, stats: LayerInputs | None) -> nn.Linear:
        found[name] = stats
        return linear

    quantize_model(model, keep, calib_batches, needs=needs, desc=driver.pop("desc", "calibrating"), **driver)
    return found


def _collect(block: nn.Module, targets: list[tuple[str, nn.Linear]], records: list[tuple[tuple, dict]],
             needs: Collection[str], keep: int, batch_size: int, generator: torch.Generator) -> dict[str, LayerInputs]:
    """Run ``block`` on every recorded input with hooks on ``targets``; statistics per target name."""
    stats: dict[str, LayerInputs] = {}
    seen: list[tuple[torch.Tensor, LayerInputs]] = []  # input tensors of this batch (held, so ids stay unique)
    done: set[int] = set()

    def make_hook(name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            if name not in stats:  # first batch: linears reading the very same tensor share one stats object
                shared = next((s for t, s in seen if t is x), None)
                stats[name] = shared if shared is not None else LayerInputs()
                seen.append((x, stats[name]))
            if id(stats[name]) not in done:
                done.add(id(stats[name]))
                n_seq = x.shape[0] if x.ndim >= 3 else 1  # (b, T, C) inputs hold b sequences
                stats[name].update(x, needs, keep * n_seq, generator)
        return hook

    handles = [linear.register_forward_hook(make_hook(name)) for name, linear in targets]
    try:
        for args, kwargs in records:
            seen.clear()
            done.clear()
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return stats
