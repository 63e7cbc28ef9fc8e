"""Shared plumbing of every parameter-efficient method: find layers, swap them, freeze, save only the adapter.

Each PEFT method in ``effref.peft`` adds a few tensors to a frozen base model. Four things are the same
for all of them and live here once:

- ``find_linears(model, targets)``: the linear-like modules (anything exposing ``in_features`` and
  ``out_features``, so an ``nn.Linear`` or a quantized linear) whose dotted name ends in one of ``targets``;
  every target must match something (a name the architecture does not have is an error listing the names
  it does have, never a silent no-op).
- ``layout_of(model)`` / ``targets_or_default``: the names each architecture gives the parts the methods
  target (LLaMA-like models, OPT, GPT-2 after ``linear_from_conv1d``, our Llama), so that a config's
  ``target_modules=None`` means "this model's query and value projections" (or its MLP, or all its linears).
- ``replace_module(model, name, new)``: put ``new`` where the module called ``name`` was.
- ``freeze_base(model)``: ``requires_grad = False`` on every parameter (methods then switch on their own).
- ``merge_adapters`` / ``unmerge_adapters`` fold adapters into the weights and back, exactly;
  ``merge_and_unload`` folds them in for good and removes the wrappers (peft's name).
- ``trainable_state_dict`` / ``load_trainable`` / ``save_trainable`` / ``load_trainable_file``: the
  method's own tensors, i.e. every parameter with ``requires_grad`` plus tensors that a module lists in
  its ``frozen_adapter_tensors`` attribute (frozen but not part of the base model, e.g. LoRA-FA's random
  A), saved with safetensors and loaded back exactly (missing, unexpected and mis-shaped keys are errors).

Glossary: target = suffix of a dotted module name ("q_proj" matches "model.layers.0.self_attn.q_proj")
          · layout = where an architecture keeps its attention, MLP and projections.
Left out: regex targets and per-layer configs (peft's ``rank_pattern``); sharded checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from effref.models.conv1d import conv1d_hint


def is_linear_like(module: nn.Module) -> bool:
    """True for modules that map in_features to out_features along the last axis (nn.Linear, quantized linears)."""
    return isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int)


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last name components of linear-like modules in ``model`` ("q_proj", "down_proj", ...)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and is_linear_like(m)})


def all_linear_names(model: nn.Module) -> tuple[str, ...]:
    """peft's ``target_modules="all-linear"``: the full names of every linear-like layer but the output head."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else getattr(model, "lm_head", None)
    return tuple(name for name, m in model.named_modules() if name and is_linear_like(m) and m is not head)


def find_linears(model: nn.Module, targets: Iterable[str], skip: tuple[type, ...] = ()) -> dict[str, nn.Module]:
    """{dotted name: module} for linear-like modules whose name equals or ends with ``.target``.

    Modules of a type in ``skip`` (e.g. an adapter already applied) and modules inside them are ignored.
    Raises ValueError listing the available linear names when nothing matches.
    """
    return find_modules(model, targets, skip, linear_only=True)


def find_modules(model: nn.Module, targets: Iterable[str], skip: tuple[type, ...] = (),
                 linear_only: bool = False) -> dict[str, nn.Module]:
    """Like ``find_linears`` but for any module ("mlp", "self_attn") unless ``linear_only``.

    Every target must match at least one module: a target the architecture does not have (``down_proj`` on
    OPT) is an error, not a part of the model silently left without its adapter.
    """
    targets = tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules={targets!r} must be a non-empty tuple of module-name suffixes, "
                         "e.g. ('q_proj', 'v_proj')")
    found: dict[str, nn.Module] = {}
    inside_skipped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_skipped):
            continue
        if skip and isinstance(module, skip):
            inside_skipped.append(name)
            continue
        kind_ok = is_linear_like(module) or not linear_only
        if name and kind_ok and any(name == t or name.endswith("." + t) for t in targets):
            found[name] = module
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in found)]
    if missing:
        what = "linear layer" if linear_only else "module"
        names = "" if len(missing) == len(targets) else f" ({', '.join(map(repr, missing))} of them)"
        raise ValueError(f"target_modules={targets!r} match no {what} of {type(model).__name__}{names}; "
                         f"its linear layers are named {linear_names(model)}{conv1d_hint(model)}")
    return found


def wrap_modules(model: nn.Module, targets: Iterable[str], make: Callable[[str, nn.Module], nn.Module],
                 skip: tuple[type, ...] = (), linear_only: bool = True) -> dict[str, nn.Module]:
    """Replace each target module by ``make(name, module)`` and freeze everything that is not new.

    Every wrapper is built before the model changes, so an error (a rank too large for one layer) leaves the
    model untouched. Returns {name: wrapper}.
    """
    found = find_modules(model, targets, skip, linear_only)
    wrapped = {name: make(name, module) for name, module in found.items()}
    freeze_base(model)
    for name, wrapper in wrapped.items():
        replace_module(model, name, wrapper)
    return wrapped


LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Layout:
    """Where one architecture keeps the parts the PEFT methods target (suffixes of module names)."""

    name: str
    attention: str  # the attention block
    mlp: str  # the MLP block; OPT has none (fc1, fc2 sit in the decoder layer), so its last linear, fc2
    query_value: tuple[str, ...]  # LoRA's default targets: the query and value projections
    key_value: tuple[str, ...]  # (IA)³ rescales the keys and values at these outputs
    mlp_out: str  # the feed-forward's last projection ((IA)³ rescales its input)
    linears: tuple[str, ...]  # every linear of a block (QLoRA, PEQA, QA-LoRA)


LAYOUTS = (
    Layout("LLaMA-like (LLaMA, Mistral, Qwen2, Gemma)", "self_attn", "mlp", ("q_proj", "v_proj"),
           ("k_proj", "v_proj"), "down_proj", LLAMA_LINEARS),
    Layout("effref Llama", "attn", "mlp", ("q_proj", "v_proj"), ("k_proj", "v_proj"), "down",
           ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "up", "down")),
    Layout("OPT", "self_attn", "fc2", ("q_proj", "v_proj"), ("k_proj", "v_proj"), "fc2",
           ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
    # GPT-2 fuses q, k and v in one c_attn (3·d wide): LoRA and (IA)³ act on all three (peft's choice too).
    Layout("GPT-2", "attn", "mlp", ("c_attn",), ("c_attn",), "mlp.c_proj", ("c_attn", "c_proj", "c_fc")),
)


def layout_of(model: nn.Module) -> Layout:
    """The first of ``LAYOUTS`` whose linear layers and attention block ``model`` has; else a ValueError."""
    linears = set(linear_names(model))
    modules = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for layout in LAYOUTS:
        if set(layout.linears) <= linears and layout.attention in modules:
            return layout
    raise ValueError(f"{type(model).__name__} has none of the layouts effref knows "
                     f"({', '.join(layout.name for layout in LAYOUTS)}): its linear layers are named "
                     f"{linear_names(model)}; pass target_modules=(...) with names from that list"
                     f"{conv1d_hint(model)}")


def targets_or_default(model: nn.Module, targets: Iterable[str] | None, role: str) -> tuple[str, ...]:
    """``targets`` as a tuple, or when it is None the ``role`` ("query_value", "linears", ...) of the model's layout."""
    if targets is not None:
        return (targets,) if isinstance(targets, str) else tuple(targets)
    value = getattr(layout_of(model), role)
    return (value,) if isinstance(value, str) else value


def linear_targets(model: nn.Module, targets: Iterable[str], method: str) -> dict[str, nn.Linear]:
    """``find_linears`` for methods that rebuild an ``nn.Linear`` (quantize it): any other match is refused."""
    found = find_linears(model, targets)
    other = {name: type(m).__name__ for name, m in found.items() if not isinstance(m, nn.Linear)}
    if other:
        name, kind = next(iter(other.items()))
        raise TypeError(f"{method} rebuilds nn.Linear layers, but {name} is a {kind} ({len(other)} such targets); "
                        "apply it to the unquantized model, or leave those layers out of target_modules")
    return found


def replace_all(model: nn.Module, new: dict[str, nn.Module]) -> None:
    """Install every ``{name: module}`` of ``new``; build them all first, so that a failure changes nothing."""
    for name, module in new.items():
        replace_module(model, name, module)


def io_features(module: nn.Module) -> tuple[int, int]:
    """(input width, output width) of a linear-like module, or of a block of linears (first in, last out)."""
    if is_linear_like(module):
        return module.in_features, module.out_features
    linears = [m for m in module.modules() if is_linear_like(m)]
    if not linears:
        raise ValueError(f"cannot tell the width of {type(module).__name__}: it holds no linear layer; "
                         "target a linear layer or a block such as 'mlp'")
    return linears[0].in_features, linears[-1].out_features


class MergeableAdapter(nn.Module):
    """Base for adapters around a linear ``self.base`` whose effect folds into the weight: W -> f(W).

    Subclasses implement ``merged_weight(weight)`` (and ``merged_bias``). ``merge()`` keeps the original
    weight and bias, so ``unmerge()`` restores them bit for bit ((W + Δ) − Δ is not W in floating point). A base without a floating-point
    ``weight`` (a quantized layer) cannot be merged: the error says so.
    """

    merged: bool = False
    _premerge: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias  # most adapters leave the bias alone; (IA)³ on an output rescales it

    def _float_weight(self) -> torch.Tensor | None:
        w = getattr(self.base, "weight", None)
        return w if isinstance(w, torch.Tensor) and w.is_floating_point() else None

    def merge(self) -> None:
        """Fold the adapter into the base weight (then forward skips the adapter)."""
        weight = self._float_weight()
        if weight is None:
            raise TypeError(f"cannot merge {type(self).__name__} into {type(self.base).__name__}: it has no "
                            "floating-point `weight`; dequantize the base layer first (replace it by an "
                            "nn.Linear with the dequantized weight) or keep the adapter unmerged")
        if self.merged:
            return
        bias = getattr(self.base, "bias", None)
        with torch.no_grad():
            new_weight = self.merged_weight(weight.detach())
            new_bias = None if bias is None else self.merged_bias(bias.detach())
            if not torch.isfinite(new_weight).all() or (new_bias is not None and not torch.isfinite(new_bias).all()):
                raise ValueError(f"merging {type(self).__name__} gives inf or NaN weights (the base or the adapter "
                                 "holds them, e.g. after a diverged training step); nothing was merged")
            self._premerge = (weight.detach().clone(), None if bias is None else bias.detach().clone())
            weight.copy_(new_weight.to(weight.dtype))
            if bias is not None:
                bias.copy_(new_bias.to(bias.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Restore the exact pre-merge base weight."""
        if not self.merged:
            return
        with torch.no_grad():
            self._float_weight().copy_(self._premerge[0])
            if self._premerge[1] is not None:
                self.base.bias.copy_(self._premerge[1])
        self._premerge, self.merged = None, False


def adapters_of(model: nn.Module, kind: type) -> dict[str, nn.Module]:
    """{name: module} of adapter type ``kind`` in ``model``; ValueError naming the fix if there is none."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, kind)}
    if not found:
        others = sorted({type(m).__name__ for m in model.modules()
                         if type(m).__module__.startswith("effref.peft.") and m is not model})
        if others:  # adapters of another kind are there: say so, rather than "apply the method first"
            raise ValueError(f"{type(model).__name__} has {', '.join(others)} layers but no {kind.__name__} "
                             "layers; only adapters that fold into a weight (LoRA and its variants, (IA)³) can "
                             "be merged — keep these adapters as they are")
        raise ValueError(f"{type(model).__name__} has no {kind.__name__} layers; apply the method first "
                         f"(e.g. apply_lora(model, LoraConfig()))")
    return found


def mergeable_adapters(model: nn.Module, kind: type = MergeableAdapter) -> dict[str, MergeableAdapter]:
    """{name: adapter} of type ``kind``, each checked to fold into a finite floating-point weight: a merge of the
    whole model then either happens everywhere or nowhere."""
    layers = adapters_of(model, kind)
    for name, layer in layers.items():
        weight = layer._float_weight()
        if weight is None:
            raise TypeError(f"cannot merge {name} ({type(layer).__name__}) into its {type(layer.base).__name__} "
                            "base: it has no floating-point `weight`; dequantize the base first, or keep the "
                            "adapter unmerged")
        with torch.no_grad():
            if not layer.merged and not torch.isfinite(layer.merged_weight(weight.detach())).all():
                raise ValueError(f"merging {name} gives inf or NaN weights (the base or the adapter holds them); "
                                 "nothing was merged")
    return layers


def merge_adapters(model: nn.Module, kind: type = MergeableAdapter) -> nn.Module:
    """Merge every adapter of type ``kind`` (default: every mergeable one) into its base weight; all or none."""
    for layer in mergeable_adapters(model, kind).values():
        layer.merge()
    return model


def unmerge_adapters(model: nn.Module, kind: type = MergeableAdapter) -> nn.Module:
    """Undo ``merge_adapters`` exactly."""
    for layer in adapters_of(model, kind).values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, kind: type = MergeableAdapter) -> nn.Module:
    """Fold every adapter of type ``kind`` into its base weight and put the base back in its place: the model
    is then plain again (a transformers model stays one, and ``save_pretrained`` / ``from_pretrained`` round
    trip it), with no wrapper and no kept copy of the pre-merge weight. peft's name for the same step; unlike
    ``merge_adapters`` it cannot be undone. Every adapter is checked before the first one is folded in."""
    layers = mergeable_adapters(model, kind)
    for name, layer in layers.items():
        layer.merge()
        layer._premerge = None  # the unmerge copy: not needed once the wrapper is gone
        replace_module(model, name, layer.base)
    return model


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Install ``new`` as the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze_base(model: nn.Module) -> None:
    """Switch off gradients for every parameter of ``model``."""
    for p in model.parameters():
        p.requires_grad_(False)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors: parameters with ``requires_grad`` plus each module's ``frozen_adapter_tensors``.

    Keys are the names of ``model.named_parameters()`` / ``named_buffers()``; values are detached CPU copies.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()  # a tensor shared by several modules (tied weights) is saved once
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = p.detach().cpu().clone()
            seen.add(id(p))
    for prefix, module in model.named_modules():
        for local in getattr(module, "frozen_adapter_tensors", ()):
            tensor = _get_tensor(module, local)
            if id(tensor) not in seen:
                seen.add(id(tensor))
                out[f"{prefix}.{local}" if prefix else local] = tensor.detach().cpu().clone()
    return out


def _get_tensor(module: nn.Module, local: str) -> torch.Tensor:
    try:
        return module.get_parameter(local)
    except AttributeError:
        return module.get_buffer(local)


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from ``trainable_state_dict``) into ``model``; keys and shapes must match exactly."""
    expected = trainable_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"adapter state does not fit this model: missing {missing[:5]}, unexpected "
                       f"{unexpected[:5]}; apply the same method with the same config before loading")
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    for name, value in state.items():  # every shape is checked before the first copy
        if tensors[name].shape != value.shape:
            raise ValueError(f"adapter tensor {name} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(tensors[name].shape)}; was it saved with another rank or config?")
    with torch.no_grad():
        for name, value in state.items():
            tensors[name].copy_(value)


def save_trainable(model: nn.Module, path: str | Path) -> int:
    """Write ``trainable_state_dict(model)`` to a safetensors file; returns the number of bytes of tensors."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in trainable_state_dict(model).items()}
    save_file(state, str(path))
    return sum(v.numel() * v.element_size() for v in state.values())


def load_trainable_file(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors file written by ``save_trainable`` into ``model`` (exact)."""
    from safetensors.torch import load_file

    load_trainable(model, load_file(str(path)))
