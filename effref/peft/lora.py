"""LoRA: low-rank adaptation of frozen linear layers (and LoRA-FA, which also freezes A).

Paper: Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen (2022), "LoRA: Low-Rank Adaptation of Large
Language Models", arXiv:2106.09685 — §4.1, Eq. 3. LoRA-FA: Zhang, Zhang, Shi, Chu, Li (2023),
arXiv:2308.03303 — §3 (A frozen at its random init, only B trained).
Implements: h = W₀x + (α/r)·B A x  (Eq. 3), with A ∈ ℝ^{r×k} Kaiming-uniform, B ∈ ℝ^{d×r} zero, so the
model is unchanged at initialisation; dropout on the adapter's input; merge W = W₀ + (α/r)·BA for
inference and an exact unmerge (the pre-merge weight is kept, because (W₀ + Δ) − Δ ≠ W₀ in floating point).
The base may be any linear-like module (nn.Linear or a quantized linear with ``in_features``,
``out_features`` and ``forward``); only a base with a floating-point ``weight`` can be merged.
Glossary: W₀ base weight (d × k = out_features × in_features) · A ``lora_A.weight`` (r × k)
          · B ``lora_B.weight`` (d × r) · r rank · α ``alpha`` · α/r ``scaling``.
Left out: rsLoRA / DoRA / PiSSA variants, LoRA on embeddings and convolutions, several named adapters
          per layer (peft's ``adapter_name``), fan_in_fan_out (GPT-2's Conv1D: convert those layers with
          ``effref.models.conv1d.linear_from_conv1d`` first).
"""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass

import torch
from torch import nn

from effref.checks import config_or_default
from effref.peft.core import (  # noqa: F401
    MergeableAdapter,
    adapters_of,
    all_linear_names,
    find_linears,
    freeze_base,
    load_trainable,
    load_trainable_file,
    merge_adapters,
    merge_and_unload,
    replace_module,
    save_trainable,
    targets_or_default,
    trainable_state_dict,
    unmerge_adapters,
    wrap_modules,
)


@dataclass
class LoraConfig:
    """LoRA's settings; peft's names are accepted too: ``lora_alpha``, ``lora_dropout``, and
    ``target_modules="all-linear"`` (every linear layer of the decoder, not the output head).
    ``target_modules=None`` takes the model's query and value projections (q_proj and v_proj; GPT-2's fused
    c_attn), as peft does per architecture."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # None: the model's query and value projections
    freeze_a: bool = False  # LoRA-FA: A stays at its random init, only B trains
    lora_alpha: InitVar[float | None] = None  # peft's name for alpha
    lora_dropout: InitVar[float | None] = None  # peft's name for dropout

    def __post_init__(self, lora_alpha: float | None, lora_dropout: float | None) -> None:
        for ours, theirs, value in (("alpha", "lora_alpha", lora_alpha), ("dropout", "lora_dropout", lora_dropout)):
            if value is not None:
                if getattr(self, ours) != getattr(type(self), ours) and getattr(self, ours) != value:
                    raise ValueError(f"{ours}={getattr(self, ours)!r} and {theirs}={value!r} disagree; "
                                     f"pass only one of them")
                setattr(self, ours, value)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r} must be a positive integer rank, e.g. r=8")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha!r} must be a positive number (the update is scaled by alpha / r; "
                             "0 would make the adapter do nothing), e.g. alpha=2 * r")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1), e.g. 0.05")
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)


def _reference_tensor(base: nn.Module) -> torch.Tensor | None:
    """A tensor of the base that tells the adapter's device (and dtype, when floating)."""
    for t in list(base.parameters()) + list(base.buffers()):
        return t
    return None


class LoraLinear(MergeableAdapter):
    """``base(x) + (alpha / r) · B(A(dropout(x)))`` around any linear-like ``base``."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, freeze_a: bool = False):
        super().__init__()
        in_f, out_f = base.in_features, base.out_features
        if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= min(in_f, out_f):
            raise ValueError(f"r={r!r} must satisfy 0 < r <= min(in_features, out_features) = "
                             f"{min(in_f, out_f)} for a {in_f}→{out_f} layer; pick a smaller rank")
        ref = _reference_tensor(base)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        device = ref.device if ref is not None else None
        self.base, self.in_features, self.out_features = base, in_f, out_f
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_f, r, bias=False, device=device, dtype=dtype)  # A: (r, k)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=device, dtype=dtype)  # B: (d, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # the nn.Linear default, as in the paper code
        nn.init.zeros_(self.lora_B.weight)  # B = 0: ΔW = BA = 0 at initialisation
        self.freeze_a = freeze_a
        self.lora_A.weight.requires_grad_(not freeze_a)
        # A frozen A is still part of the adapter: save/load must carry it (see core.trainable_state_dict).
        self.frozen_adapter_tensors = ("lora_A.weight",) if freeze_a else ()

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r)·B A, shape (out_features, in_features)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)  # (d, r) @ (r, k) -> (d, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (..., d)
        if self.merged:
            return out
        a = self.lora_A.weight
        update = self.lora_B(self.lora_A(self.dropout(x.to(a.dtype))))  # (..., k) -> (..., r) -> (..., d)
        return out + (self.scaling * update).to(out.dtype)  # Eq. 3

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight().to(weight.dtype)  # W = W₀ + (α/r)·BA

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, freeze_a={self.freeze_a}, merged={self.merged}"


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap every linear-like layer whose name ends with one of ``cfg.target_modules`` in a ``LoraLinear``.

    Every other parameter is frozen. Ranks are checked against each layer before anything changes, so a
    failing call leaves the model untouched. Returns ``model`` (modified in place).
    """
    cfg = config_or_default(cfg, LoraConfig, "LoraConfig(r=8, alpha=16)")

    def make(name: str, layer: nn.Module) -> LoraLinear:
        if cfg.r > min(layer.in_features, layer.out_features):
            raise ValueError(f"r={cfg.r} exceeds min(in_features, out_features) = "
                             f"{min(layer.in_features, layer.out_features)} of layer {name}; pick r <= that")
        return LoraLinear(layer, cfg.r, cfg.alpha, cfg.dropout, cfg.freeze_a)

    wrap_modules(model, lora_targets(model, cfg), make, skip=(LoraLinear,))
    return model


def lora_targets(model: nn.Module, cfg: LoraConfig) -> tuple[str, ...]:
    """The module-name suffixes ``cfg.target_modules`` stands for in ``model`` ("all-linear", None: the layout's)."""
    if cfg.target_modules == ("all-linear",):
        return all_linear_names(model)
    return targets_or_default(model, cfg.target_modules, "query_value")


def apply_lora_fa(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """LoRA-FA: ``apply_lora`` with A frozen at its random projection (only B is trained)."""
    cfg = config_or_default(cfg, LoraConfig, "LoraConfig(r=8, alpha=16)")
    cfg = LoraConfig(cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules, freeze_a=True)
    return apply_lora(model, cfg)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """{name: LoraLinear} in ``model``; ValueError if there is none."""
    return adapters_of(model, LoraLinear)


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer into its base weight (exact ``unmerge_lora`` afterwards)."""
    return merge_adapters(model, LoraLinear)


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora`` exactly."""
    return unmerge_adapters(model, LoraLinear)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the A and B matrices (trained or frozen), keyed by their parameter names."""
    return {f"{name}.{part}.weight": getattr(layer, part).weight.detach().cpu().clone()
            for name, layer in lora_layers(model).items() for part in ("lora_A", "lora_B")}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load A and B matrices saved by ``lora_state_dict``; keys and shapes must match exactly."""
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"LoRA state does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                       "apply_lora with the same target_modules first")
    params = dict(model.named_parameters())
    for name, value in state.items():  # every shape is checked before the first copy
        if params[name].shape != value.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(params[name].shape)}; was it saved with another rank r?")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
