"""The calibration walk every one-shot compression method shares: each linear's inputs, block by block.

Papers: the sequential layer-wise scheme of OBC/GPTQ (Frantar et al., 2022–2023, arXiv:2208.11580,
arXiv:2210.17323) that SparseGPT (arXiv:2301.00774, §3) and Wanda (arXiv:2306.11695, §3) use for pruning
and GPTQ/AWQ for quantization.
Implements, for a model whose decoder blocks sit in an ``nn.ModuleList``:
  1. capture what block 0 receives for each calibration batch (stop the forward pass right there), and what
     every block receives beside its hidden state (rotary tables, masks): shared in LLaMA, per layer in a
     family like Gemma 2 (sliding-window and global layers), where each block then gets its own;
  2. for block i, run it with forward hooks on its target linears, accumulating statistics of each linear's
     input rows X (n × C): H = XᵀX / n, per-channel mean x², max |x|, mean |x|, min, max, sampled rows;
  3. hand every target linear and its statistics to ``layer_fn``, which may change it in place or return a
     replacement module;
  4. sequential=True: run the changed block again, so block i + 1 is calibrated on what the compressed model
     really feeds it; sequential=False: block i + 1 gets the outputs of the untouched block (one dense pass,
     which is also how ``collect_input_stats`` gathers statistics once for several experiments).
Linears that read the same tensor (q/k/v, gate/up) share one statistics object, computed once.
The Hessian helpers of second-order methods live in ``effref.compression.hessian``.
Glossary: X inputs of one linear (n tokens × C channels) · H = XᵀX / n (the layer loss Hessian up to 2/n)
          · block = decoder layer.
Left out: "true sequential" order inside a block (q/k/v and o of one block all see the block's inputs);
offloading blocks to save accelerator memory.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from effref.models.conv1d import conv1d_hint
from effref.runtime import progress_bar

STATS = ("hessian", "sq_mean", "abs_max", "abs_mean", "min", "max", "samples")
LayerFn = Callable[[str, nn.Linear, "InputStats | None"], "nn.Module | None"]


@dataclass
class InputStats:
    """Statistics of the input rows X (n × C) one linear saw (only those asked for are filled)."""

    n_tokens: int = 0
    hessian: torch.Tensor | None = None  # (C, C) XᵀX / n, float32
    sq_mean: torch.Tensor | None = None  # (C,) mean x² per channel = diag(H); ||X_j||₂ = sqrt(n · sq_mean_j)
    abs_max: torch.Tensor | None = None  # (C,)
    abs_mean: torch.Tensor | None = None  # (C,)
    min: torch.Tensor | None = None  # (C,)
    max: torch.Tensor | None = None  # (C,)
    samples: torch.Tensor | None = None  # (m, C) seeded choice of rows of X

    def update(self, x: torch.Tensor, needs: Collection[str], keep: int, generator: torch.Generator) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (n, C)
        n_old, n = self.n_tokens, x.shape[0]
        self.n_tokens += n

        def mean(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:  # running mean over all rows
            return new if old is None else old * (n_old / self.n_tokens) + new * (n / self.n_tokens)

        if "hessian" in needs:
            self.hessian = mean(self.hessian, x.T @ x / n)  # (C, C)
        if "sq_mean" in needs:
            self.sq_mean = mean(self.sq_mean, x.pow(2).mean(0))  # (C,)
        if "abs_mean" in needs:
            self.abs_mean = mean(self.abs_mean, x.abs().mean(0))
        for name, reduce, pick in (("abs_max", lambda t: t.abs().amax(0), torch.maximum),
                                   ("min", lambda t: t.amin(0), torch.minimum),
                                   ("max", lambda t: t.amax(0), torch.maximum)):
            if name in needs:
                old = getattr(self, name)
                setattr(self, name, reduce(x) if old is None else pick(old, reduce(x)))
        if "samples" in needs and keep > 0:
            rows = x[torch.randperm(n, generator=generator)[:keep].to(x.device)]  # (≤ keep, C)
            self.samples = rows if self.samples is None else torch.cat([self.samples, rows])


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, module) of the decoder's block list: the longest ``nn.ModuleList`` of blocks with linears."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        longer = isinstance(module, nn.ModuleList) and len(module) > (len(best[1]) if best else 0)
        if longer and all(any(isinstance(m, nn.Linear) for m in block.modules()) for block in module):
            best = (name, module)
    if best is None:
        raise ValueError(f"found no nn.ModuleList of blocks with linear layers in {type(model).__name__}"
                         f"{conv1d_hint(model)}")
    return best


def block_linears(model: nn.Module, target: Callable[[str, nn.Module], bool] | None = None,
                  block_ids: Sequence[int] | None = None) -> dict[int, dict[str, nn.Linear]]:
    """{block index: {name inside the block: linear}} for the linears ``target(name, module)`` selects."""
    prefix, blocks = find_blocks(model)
    chosen = range(len(blocks)) if block_ids is None else sorted(set(block_ids))
    if any(not 0 <= i < len(blocks) for i in chosen):
        raise ValueError(f"block_ids={list(block_ids)} out of range; the model has {len(blocks)} blocks")
    plan = {}
    for i in chosen:
        found = {name: m for name, m in blocks[i].named_modules() if isinstance(m, nn.Linear)
                 and (target is None or target(f"{prefix}.{i}.{name}", m))}
        if found:
            plan[i] = found
    if not plan:
        raise ValueError("target= selected no nn.Linear inside the chosen blocks; nothing to compress")
    return plan


class _Captured(Exception):
    """Raised by the capture hook once the last block wanted is recorded: the rest of the pass is not needed."""


def _block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: torch.Tensor,
                  batch_size: int) -> tuple[list[tuple[tuple, dict]], list[list[tuple[tuple, dict]]] | None]:
    """What the model's own forward pass feeds the blocks, per calibration batch.

    Returns (block 0's (args, kwargs) per batch, and for every block the arguments beside the hidden state,
    ``(args[1:], kwargs)`` per batch — or None when every block gets block 0's, as in LLaMA, where the rotary
    tables and the mask are shared). A family whose layers differ (Gemma 2: sliding-window layers with their own
    RoPE base and mask) gets each block's own, so no block is calibrated on another block's positions.
    """
    is_hf = hasattr(model, "config") and not hasattr(model, "cfg")
    chunks = [batches[start:start + batch_size] for start in range(0, batches.shape[0], batch_size)]  # (b, T) each

    def capture(chunk: torch.Tensor, last: int) -> list[tuple[tuple, dict]]:
        """Run the forward pass over ``chunk`` up to block ``last``, recording what each block receives."""
        seen: list[tuple[tuple, dict]] = []

        def hook(module, args, kwargs):
            seen.append((args, kwargs) if not seen else ((None, *args[1:]), kwargs))  # later hidden states: not kept
            if len(seen) > last:
                raise _Captured

        handles = [block.register_forward_pre_hook(hook, with_kwargs=True) for block in blocks]
        try:
            model(chunk, use_cache=False) if is_hf else model(chunk)
        except _Captured:
            pass
        finally:
            for h in handles:
                h.remove()
        return seen

    first = capture(chunks[0], len(blocks) - 1)  # one full pass: do the blocks differ in what they get?
    if all(_same(extras(first[i]), extras(first[0])) for i in range(1, len(blocks))):
        return [first[0]] + [capture(chunk, 0)[0] for chunk in chunks[1:]], None
    per_batch = [first] + [capture(chunk, len(blocks) - 1) for chunk in chunks[1:]]
    return [seen[0] for seen in per_batch], [[extras(seen[i]) for seen in per_batch] for i in range(len(blocks))]


def extras(call: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """A block call's arguments beside the hidden state (its first positional argument)."""
    args, kwargs = call
    return args[1:], kwargs


def _same(a, b) -> bool:
    """Whether two block calls' extra arguments are the same (tensors by identity or by value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and (a is b or torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _run_block(block: nn.Module, linears: dict[str, nn.Linear], records: list[tuple[tuple, dict]],
               needs: Collection[str], keep: int, generator: torch.Generator,
               ) -> tuple[dict[str, InputStats], list[torch.Tensor]]:
    """Run ``block`` on every record with hooks on ``linears``; (statistics per name, block outputs)."""
    stats: dict[str, InputStats] = {}
    # (data_ptr, shape) of an input tensor within one batch -> (the tensor, its stats). Holding the tensor keeps
    # its memory from being reused by a later input of the same shape, which would alias two inputs.
    seen: dict[tuple, tuple[torch.Tensor, InputStats]] = {}
    done: set[int] = set()

    def make_hook(name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            if name not in stats:  # first batch decides which linears share an input
                stats[name] = seen.setdefault((x.data_ptr(), tuple(x.shape)), (x, InputStats()))[1]
            else:
                seen.setdefault((x.data_ptr(), tuple(x.shape)), (x, stats[name]))
            if id(stats[name]) not in done:
                done.add(id(stats[name]))
                stats[name].update(x, needs, keep * (x.shape[0] if x.ndim >= 3 else 1), generator)
        return hook

    handles = [m.register_forward_hook(make_hook(name)) for name, m in linears.items()]
    outputs = []
    try:
        for args, kwargs in records:
            seen.clear()
            done.clear()
            outputs.append(_hidden(block(*args, **kwargs)))
    finally:
        for h in handles:
            h.remove()
    return stats, outputs


def _check_needs(needs: Collection[str]) -> None:
    unknown = set(needs) - set(STATS)
    if unknown:
        raise ValueError(f"needs={sorted(unknown)} are not known statistics; use a subset of {STATS}")


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@torch.no_grad()
def walk_linears(model: nn.Module, layer_fn: LayerFn, calib_batches: torch.Tensor | None = None,
                 needs: Collection[str] = (), target: Callable[[str, nn.Module], bool] | None = None,
                 block_ids: Sequence[int] | None = None, sequential: bool = True, batch_size: int = 4,
                 max_samples: int = 512, seed: int = 0, progress: bool = True,
                 desc: str = "calibrating", check: Callable[[str, nn.Linear], None] | None = None) -> nn.Module:
    """Call ``layer_fn(name, linear, stats)`` on every target linear of the decoder blocks; return the model.

    Validate first, then change: before any forward pass or any ``layer_fn`` call, every target linear must
    have finite weights and pass ``check(name, linear)`` (which raises with the fix), so that a method refusing
    one layer leaves the model exactly as it was.

    ``stats`` is an :class:`InputStats` holding the statistics named in ``needs`` (a subset of ``STATS``), or
    None when ``needs`` is empty (then no calibration forward runs). ``layer_fn`` returns a replacement
    module or None (the linear stays, possibly changed in place). ``name`` is the full dotted name.
    ``calib_batches`` (n, T) token ids are required when ``needs`` is not empty; see the module docstring
    for ``sequential``. ``target(name, module)`` filters linears; ``block_ids`` restricts the blocks.
    """
    _check_needs(needs)
    if needs and calib_batches is None:
        raise ValueError(f"this method needs calibration data ({', '.join(sorted(needs))}) but calib_batches=None;"
                         " pass calib_batches=calibration_batches(ids, n, seq_len)")
    if calib_batches is not None and (not isinstance(calib_batches, torch.Tensor) or calib_batches.ndim != 2
                                      or calib_batches.is_floating_point()):
        raise ValueError("calib_batches must be a (n, T) tensor of token ids, got "
                         f"{getattr(calib_batches, 'shape', type(calib_batches).__name__)}")
    if calib_batches is not None and calib_batches.numel() == 0:
        raise ValueError(f"calib_batches of shape {tuple(calib_batches.shape)} holds no tokens; pass at least one "
                         "sequence, e.g. calibration_batches(ids, n=16, seq_len=256)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    prefix, blocks = find_blocks(model)
    plan = block_linears(model, target, block_ids)
    for i, linears in plan.items():
        for name, linear in linears.items():
            if not torch.isfinite(linear.weight).all():
                raise ValueError(f"{prefix}.{i}.{name} has inf or NaN weights; compressing them would carry the "
                                 "damage on silently, so find where they came from (a diverged training step?)")
            if check is not None:
                check(f"{prefix}.{i}.{name}", linear)
    bar = progress_bar(total=sum(len(v) for v in plan.values()), desc=desc, disable=not progress)
    records, block_extras, keep, generator = None, None, 0, torch.Generator().manual_seed(seed)
    if needs:
        device = next(model.parameters()).device
        records, block_extras = _block_inputs(model, blocks, calib_batches.to(device), batch_size)
        keep = -(-max_samples // calib_batches.shape[0])  # sampled rows per sequence
    for i in range(max(plan) + 1):
        stats, outputs = {}, None
        if records is not None and (i in plan or not sequential):
            stats, outputs = _run_block(blocks[i], plan.get(i, {}), records, needs, keep, generator)
        for name, linear in plan.get(i, {}).items():
            new = layer_fn(f"{prefix}.{i}.{name}", linear, stats.get(name))
            if new is not None:
                _set_module(blocks[i], name, new)
            bar.update(1)
            bar.set_postfix(block=i)
        if records is not None and i < max(plan):  # outputs of block i are the inputs of block i + 1
            if sequential:
                outputs = [_hidden(blocks[i](*args, **kwargs)) for args, kwargs in records]
            nxt = block_extras[i + 1] if block_extras is not None else [extras(r) for r in records]
            records = [((out,) + tuple(rest), kwargs) for out, (rest, kwargs) in zip(outputs, nxt)]
    bar.close()
    return model


def map_linears(model: nn.Module, layer_fn: LayerFn, needs: Collection[str] = (),
                calib_batches: torch.Tensor | None = None, stats: dict[str, InputStats] | None = None,
                **walk_kwargs) -> nn.Module:
    """``walk_linears`` whose statistics come from ``calib_batches`` (a sequential walk, the papers' scheme)
    or from ``stats`` gathered beforehand by ``collect_input_stats`` (no forward pass at all)."""
    _check_needs(needs)
    if stats is None:
        if needs and calib_batches is None:
            raise ValueError(f"this method needs calibration data ({', '.join(sorted(needs))}) but calib_batches=None;"
                             " pass calib_batches=(n, T) token ids or stats=collect_input_stats(model, calib_batches)")
        return walk_linears(model, layer_fn, calib_batches, needs, **walk_kwargs)

    method_check = walk_kwargs.pop("check", None)

    def check(name: str, linear: nn.Linear) -> None:  # every layer's statistics exist before anything changes
        s = stats.get(name)
        missing = [k for k in needs if s is None or getattr(s, k) is None]
        if missing:
            raise ValueError(f"stats for {name} lack {missing}; collect them with needs={tuple(needs)}")
        if method_check is not None:
            method_check(name, linear)

    def from_stats(name: str, linear: nn.Linear, _: InputStats | None) -> nn.Module | None:
        return layer_fn(name, linear, stats[name])

    return walk_linears(model, from_stats, None, (), check=check, **walk_kwargs)


def collect_input_stats(model: nn.Module, calib_batches: torch.Tensor, needs: Collection[str] = ("hessian",),
                        **kwargs) -> dict[str, InputStats]:
    """{linear name: InputStats} of the unmodified model in one dense pass (``walk_linears``, sequential=False).

    Lets a chapter calibrate once and compare many methods and settings on the same statistics.
    """
    stats: dict[str, InputStats] = {}

    def record(name: str, linear: nn.Linear, s: InputStats | None) -> None:
        stats[name] = s

    walk_linears(model, record, calib_batches, needs, sequential=False, desc=kwargs.pop("desc", "calibration"),
                 **kwargs)
    return stats
