"""LiGO: a learned linear growth operator from a small pre-trained model to a larger one.

Paper: Wang, Panda, Torroba Hennigen, Greengard, Karlinsky, Feris, Cox, Wang, Kim (2023), "Learning to Grow Pretrained Models for Efficient
Transformer Training", ICLR 2023, arXiv:2303.00980 — §3.2 (Eq. 5–8).
Implements: the grown parameters are a linear function of the small ones, Θ' = L_depth R_width Θ, with
  width   W'_l = E_out W_l E_inᵀ         (each weight; a vector b'_l = E_out b_l, the embeddings X' = X E_outᵀ)
  depth   W'_k = Σ_l D[k, l] · W'_l      (every block parameter of new block k mixes the widened small blocks)
and the expansion matrices E and the depth weights D are trained on the language-model loss for a few steps
(the small weights frozen) before the grown model is materialised and trained as usual. Writing FPI (bert2BERT)
in this form gives E_out = S (S[j, g(j)] = 1, copies) and E_in = S / C (divided by the copy counts), and
stacking gives D[k, l] = [l = k mod L]: both are points of LiGO's space, and are where we start it.
Glossary: E_out / E_in ``expand["<dim>_copy"]`` / ``expand["<dim>_split"]`` (d' × d) for dim ∈ {hidden,
          units, ff} · D ``depth[<parameter>]`` (L' × L) · S, C the FPI mapping and copy counts.
Simplified: one hidden expansion for the whole model and one pair per block for the attention units and the MLP
          (the paper ties them in the same way); separate E_out and E_in instead of the paper's single
          matrix per dimension (FPI needs the division); no Kronecker factorisation of L_depth R_width (our
          models are small enough to form every W' directly).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.func import functional_call

from effref.pretraining.growth.bert2bert import _check_width, parameter_axes, width_maps
from effref.pretraining.growth.transformer import TinyTransformer


def selection(g: torch.Tensor, old: int, split: bool) -> torch.Tensor:
    """(new, old) matrix of the mapping g: S[j, g(j)] = 1, or 1 / C(g(j)) for an input ("split") expansion."""
    matrix = torch.zeros(len(g), old)
    matrix[torch.arange(len(g)), g] = 1.0 / torch.bincount(g, minlength=old)[g].float() if split else 1.0
    return matrix


def apply_along(matrix: torch.Tensor, tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Multiply axis ``dim`` of ``tensor`` by ``matrix`` (new × old): the axis grows from old to new."""
    return torch.movedim(torch.tensordot(matrix, tensor, dims=([1], [dim])), 0, dim)


class LiGO(nn.Module):
    """The growth operator from ``model`` (frozen copy) to the size given; its parameters are E and D only."""

    def __init__(self, model: TinyTransformer, d_model: int, n_heads: int, d_ff: int, n_layers: int,
                 seed: int = 0, noise_std: float = 0.0):
        super().__init__()
        cfg = _check_width(model, d_model, n_heads, d_ff)
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < cfg.n_layers:
            raise ValueError(f"n_layers={n_layers!r} must be an int ≥ the model's {cfg.n_layers} blocks "
                             "(growth cannot remove blocks)")
        if not noise_std >= 0:
            raise ValueError(f"noise_std={noise_std} must be ≥ 0 (0 starts exactly at FPI + stacking)")
        self.small_layers = cfg.n_layers
        self.grown_cfg = replace(cfg, d_model=d_model, n_heads=n_heads, d_ff=d_ff, n_layers=n_layers)
        self._skeleton = (TinyTransformer(self.grown_cfg).to("meta"),)  # a tuple: not a submodule
        for name, tensor in model.state_dict().items():
            self.register_buffer("small_" + name.replace(".", "_"), tensor.detach().clone())
        self.small_names = list(model.state_dict())
        maps = width_maps(cfg, d_model, n_heads, d_ff, seed)
        old = {"hidden": cfg.d_model, "units": cfg.n_heads * cfg.d_head, "ff": cfg.d_ff}
        generator = torch.Generator().manual_seed(seed)
        self.expand = nn.ParameterDict()
        for key in ["hidden"] + [f"{kind}{layer}" for layer in range(cfg.n_layers) for kind in ("units", "ff")]:
            kind = key.rstrip("0123456789")
            for role in ("copy", "split"):
                start = selection(maps.of(kind), old[kind], split=role == "split")
                start += noise_std * start.abs().max() * torch.randn(start.shape, generator=generator)
                self.expand[f"{key}_{role}"] = nn.Parameter(start)
        stack = torch.zeros(n_layers, cfg.n_layers)
        stack[torch.arange(n_layers), torch.arange(n_layers) % cfg.n_layers] = 1.0  # D of stacking
        self.block_suffixes = sorted({n.split(".", 2)[2] for n in self.small_names if n.startswith("blocks.")})
        self.depth = nn.ParameterDict({s.replace(".", "_"): nn.Parameter(stack.clone()) for s in self.block_suffixes})
        self.to(next(model.parameters()).device)

    def widen(self, name: str, layer: int | None) -> torch.Tensor:
        """R_width on one small parameter: E_out on its copy axes, E_in on its split axes."""
        tensor = getattr(self, "small_" + name.replace(".", "_"))
        for dim, axis in enumerate(parameter_axes(name)):
            if axis is not None:
                kind, role = axis
                key = kind if kind == "hidden" else f"{kind}{layer}"
                tensor = apply_along(self.expand[f"{key}_{role}"], tensor, dim)
        return tensor

    def grown_state(self) -> dict[str, torch.Tensor]:
        """Θ' = L_depth R_width Θ: every parameter of the grown model, differentiable in E and D."""
        state = {n: self.widen(n, None) for n in self.small_names if not n.startswith("blocks.")}
        for suffix in self.block_suffixes:  # "attn.q.weight", ...
            widened = torch.stack([self.widen(f"blocks.{layer}.{suffix}", layer)
                                   for layer in range(self.small_layers)])  # (L, ...)
            mixed = torch.tensordot(self.depth[suffix.replace(".", "_")], widened, dims=([1], [0]))  # (L', ...)
            state.update({f"blocks.{k}.{suffix}": mixed[k] for k in range(self.grown_cfg.n_layers)})
        return state

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        skeleton = self._skeleton[0]
        return functional_call(skeleton, self.grown_state(), (input_ids,))  # (B, T, V)

    @torch.no_grad()
    def materialize(self) -> TinyTransformer:
        """The grown model with Θ' = M Θ as ordinary weights, ready to train."""
        grown = TinyTransformer(self.grown_cfg)
        grown.load_state_dict({n: t.detach().clone() for n, t in self.grown_state().items()})
        return grown.to(self.expand["hidden_copy"].device)
