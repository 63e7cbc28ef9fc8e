"""Bottleneck adapters, series and parallel, as compared for LLMs by LLM-Adapters.

Papers: Houlsby, Giurgiu, Jastrzebski, Morrone, de Laroussilhe, Gesmundo, Attariyan, Gelly (2019),
"Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751 — §2.1 (series adapter);
He, Zhou, Ma, Berg-Kirkpatrick, Neubig (2022), "Towards a Unified View of Parameter-Efficient Transfer
Learning", arXiv:2110.04366 — §3 (parallel adapter); Hu, Wang, Lan, Xu, Lim, Bing, Xu, Poria, Lee (2023),
"LLM-Adapters", arXiv:2304.01933 — §2 (placements for LLaMA: series after the MLP, parallel beside it).
Implements, around a module f (an attention or MLP block, or one linear layer) with input x and output y = f(x):
  series:    y' = y + W_up σ(W_down y)          (the adapter reads f's output)
  parallel:  y' = y + s · W_up σ(W_down x)      (the adapter reads f's input, beside f)
with a bottleneck of width m ≪ d, σ = ReLU (Houlsby) and W_up zero-initialised, so the model is unchanged
at initialisation. Neither form can be merged into a weight (σ is non-linear between the two matrices).
Glossary: d model width · m ``bottleneck`` · W_down ``adapter_down`` (d → m) · W_up ``adapter_up`` (m → d)
          · s ``scaling`` (parallel only).
By default every layer gets two adapters, one on its attention block and one on its MLP (survey §2.3.1): the
blocks the model's layout names (``effref.peft.core.LAYOUTS``). OPT has no MLP module (fc1 and fc2 sit in the
decoder layer), so there the MLP adapter goes around fc2: in series that is the same as after the MLP; in
parallel it reads fc2's input (the ffn-wide activation) instead of the block's input.
Left out: AdapterFusion, Houlsby's trainable layer norms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from effref.checks import config_or_default
from effref.peft.core import io_features, layout_of, wrap_modules

PLACEMENTS = ("series", "parallel")


@dataclass
class AdapterConfig:
    bottleneck: int = 16
    placement: str = "series"  # "series" or "parallel"
    target_modules: tuple[str, ...] | None = None  # blocks (or linears); None: the model's attention and MLP
    scaling: float = 1.0  # parallel adapters only

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement={self.placement!r} is not known; use one of {PLACEMENTS}")
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck <= 0:
            raise ValueError(f"bottleneck={self.bottleneck!r} must be a positive integer width, e.g. 16")
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)


class BottleneckAdapter(nn.Module):
    """A module ``f`` plus a bottleneck adapter in series (reads f's output) or in parallel (reads f's input)."""

    def __init__(self, base: nn.Module, bottleneck: int, placement: str = "series", scaling: float = 1.0):
        super().__init__()
        d_in, d_out = io_features(base)
        if placement == "series":
            d_in = d_out
        if bottleneck > min(d_in, d_out):
            raise ValueError(f"bottleneck={bottleneck} is wider than the layer ({d_in} → {d_out}); a bottleneck "
                             f"must be <= {min(d_in, d_out)}")
        ref = next(base.parameters())
        self.base, self.placement, self.scaling = base, placement, scaling
        self.adapter_down = nn.Linear(d_in, bottleneck, device=ref.device, dtype=ref.dtype)  # W_down: (m, d)
        self.adapter_up = nn.Linear(bottleneck, d_out, device=ref.device, dtype=ref.dtype)  # W_up: (d, m)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]  # transformers' attention is called by keyword
        out = self.base(*args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out  # (..., d); transformers' attention returns (y, weights)
        if self.placement == "series":
            y = y + self.adapter_up(torch.relu(self.adapter_down(y)))  # y + W_up σ(W_down y)
        else:
            y = y + self.scaling * self.adapter_up(torch.relu(self.adapter_down(x)))  # y + s W_up σ(W_down x)
        return (y, *out[1:]) if isinstance(out, tuple) else y


def apply_adapters(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Wrap every module whose name ends with one of ``cfg.target_modules`` and freeze the rest (in place)."""
    cfg = config_or_default(cfg, AdapterConfig, "AdapterConfig(bottleneck=16)")
    targets = cfg.target_modules
    if targets is None:
        layout = layout_of(model)
        targets = (layout.attention, layout.mlp)

    def make(name: str, block: nn.Module) -> BottleneckAdapter:
        return BottleneckAdapter(block, cfg.bottleneck, cfg.placement, cfg.scaling)

    wrap_modules(model, targets, make, skip=(BottleneckAdapter,), linear_only=False)
    return model
