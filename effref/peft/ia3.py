"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations — three learned rescaling vectors.

Paper: Liu, Tam, Muqeeth, Mohta, Huang, Bansal, Raffel (2022), "Few-Shot Parameter-Efficient Fine-Tuning is
Better and Cheaper than In-Context Learning", arXiv:2205.05638 — §3.3.
Implements: softmax(Q (l_k ⊙ K)ᵀ / √d)(l_v ⊙ V) and (l_ff ⊙ γ(W₁x)) W₂: keys and values are rescaled
elementwise at the output of k_proj / v_proj, and the feed-forward's hidden activation at the input of its
last projection (down_proj). Vectors start at 1, so the model is unchanged at initialisation. Merging folds
each vector into its weight: l ⊙ (W x) = (diag(l) W) x for an output, W (l ⊙ x) = (W diag(l)) x for an input.
By default the targets are the model's own (``effref.peft.core.LAYOUTS``): k_proj, v_proj and the MLP's last
projection (down_proj; OPT's fc2; GPT-2's mlp.c_proj). GPT-2 computes q, k and v in one fused c_attn, so there
the vector rescales the queries too (peft does the same).
Glossary: l_k, l_v ``ia3_l`` of k_proj / v_proj (out_features) · l_ff ``ia3_l`` of down_proj (in_features)
          · "feed-forward" layer = one rescaled at its input.
Left out: the paper's T-Few recipe (unlikelihood and length-normalised losses, pre-training of the vectors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from effref.checks import config_or_default
from effref.peft.core import LAYOUTS, MergeableAdapter, layout_of, wrap_modules

FEEDFORWARD_NAMES = tuple(dict.fromkeys(layout.mlp_out for layout in LAYOUTS))  # down_proj, down, fc2, mlp.c_proj


@dataclass
class IA3Config:
    target_modules: tuple[str, ...] | None = None  # None: the model's k_proj, v_proj and MLP output projection
    feedforward_modules: tuple[str, ...] | None = None  # rescaled at the input; None: the MLP output projection

    def __post_init__(self) -> None:
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
        if self.feedforward_modules is not None:
            self.feedforward_modules = tuple(self.feedforward_modules)
        if self.target_modules is not None and self.feedforward_modules is not None:
            _check_feedforward(self.target_modules, self.feedforward_modules)

    def resolve(self, model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(targets, feed-forward targets) in ``model``: the given ones, or the model's layout's where None."""
        targets, feedforward = self.target_modules, self.feedforward_modules
        if targets is None:
            layout = layout_of(model)
            targets = (*layout.key_value, layout.mlp_out)
        if feedforward is None:  # the targets named like an MLP output projection: down_proj, fc2, ...
            feedforward = tuple(t for t in targets if t in FEEDFORWARD_NAMES)
        _check_feedforward(targets, feedforward)
        return targets, feedforward


def _check_feedforward(targets: tuple[str, ...], feedforward: tuple[str, ...]) -> None:
    stray = [m for m in feedforward if m not in targets]
    if stray:
        raise ValueError(f"feedforward_modules={stray} are not in target_modules={targets}; "
                         "every feed-forward module must also be a target")


class IA3Linear(MergeableAdapter):
    """``base(l ⊙ x)`` (feed-forward layer) or ``l ⊙ base(x)`` around a linear-like ``base``; l starts at 1."""

    def __init__(self, base: nn.Module, feedforward: bool):
        super().__init__()
        self.base, self.feedforward = base, feedforward
        self.in_features, self.out_features = base.in_features, base.out_features
        ref = next(iter(list(base.parameters()) + list(base.buffers())), None)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        width = base.in_features if feedforward else base.out_features
        self.ia3_l = nn.Parameter(torch.ones(width, dtype=dtype, device=None if ref is None else ref.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.feedforward:
            return self.base(x * self.ia3_l.to(x.dtype))  # (..., k) ⊙ l_ff
        out = self.base(x)  # (..., d)
        return out * self.ia3_l.to(out.dtype)  # l_k ⊙ K or l_v ⊙ V

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:  # weight: (d, k)
        return weight * self.ia3_l[None, :] if self.feedforward else weight * self.ia3_l[:, None]

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.feedforward else bias * self.ia3_l


def apply_ia3(model: nn.Module, cfg: IA3Config) -> nn.Module:
    """Wrap the target linears of ``model`` in ``IA3Linear`` and freeze everything else (in place)."""
    cfg = config_or_default(cfg, IA3Config, "IA3Config()")
    targets, feedforward = cfg.resolve(model)

    def make(name: str, layer: nn.Module) -> IA3Linear:
        return IA3Linear(layer, feedforward=any(name == t or name.endswith("." + t) for t in feedforward))

    wrap_modules(model, targets, make, skip=(IA3Linear,))
    return model
