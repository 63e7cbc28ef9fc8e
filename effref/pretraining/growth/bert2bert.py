"""bert2BERT width growth: function-preserving initialisation (FPI) and advanced knowledge initialisation (AKI).

Paper: Chen, Yin, Shang, Jiang, Qin, Wang, Wang, Chen, Liu, Liu (2022), "bert2BERT: Towards Reusable Pretrained
Language Models", ACL 2022, arXiv:2110.07143 — §3.2 (FPI), §3.3 (AKI); FPI generalises Net2Net's Net2WiderNet
(Chen, Goodfellow, Shlens 2016, arXiv:1511.05641).
Implements: every dimension that grows (the hidden size, the attention heads, the MLP width) gets a mapping
g: new index → old index, the identity on the old indices and random old units for the new ones. A weight
W (d_out × d_in) of the small model becomes
  FPI   W'[j, i] = W[g_out(j), g_in(i)] / C_in(g_in(i)),    b'[j] = b[g_out(j)],
where C(k) = |{i : g(i) = k}| counts the copies of unit k: outputs are copied, inputs are divided among their
copies, so every copy of a unit receives exactly the old unit's value and the next layer sums them back to it.
  AKI   the same, except that in block l the rows of the *new* output units come from block l + 1 (the top
        block uses itself): the grown layer is not the small one any more, it also carries the next layer's
        knowledge, and its copies are no longer symmetric.
LayerNorm: γ, β are copied like outputs. The grown hidden vector x' = x[g] has the mean and variance of x
exactly when every old unit has the same number of copies, so we draw the new hidden units as whole random
permutations of the old ones: with d_model' a multiple of d_model the grown model computes the small model's
function to float rounding, LayerNorms included. Any other d_model' is accepted, and is then function-preserving
only without LayerNorm (norm="none"); with LayerNorm it is approximate (our simplification: no gain correction).
Glossary: g ``WidthMaps.hidden / heads / ff`` · C the copy counts (``torch.bincount``) · d_head fixed, so the
          heads grow by whole heads (BERT's sizes all keep 64-wide heads too).
Left out: the paper's two-stage pre-training schedule after growth (we train the grown model normally), the
          separate per-layer mappings (one mapping per dimension serves every layer).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from effref.pretraining.growth.transformer import TinyTransformer, TinyTransformerConfig

Axis = tuple[str, str] | None  # (which dimension: "hidden", "units" or "ff"; "copy" or "split"), or None


def parameter_axes(name: str) -> tuple[Axis, ...]:
    """What each axis of the TinyTransformer parameter ``name`` indexes, and how growth treats it."""
    module, kind = name.split(".")[-2:]  # "blocks.0.attn.q.weight" -> ("q", "weight")
    hidden_out, hidden_in = ("hidden", "copy"), ("hidden", "split")
    if module in ("tok", "pos"):
        return None, hidden_out  # (V or T, d_model): every row is a hidden vector
    if module in ("ln1", "ln2", "ln_f"):
        return (hidden_out,)
    if module == "head":
        return None, hidden_in  # (V, d_model)
    if module in ("q", "k", "v"):
        return (("units", "copy"), hidden_in) if kind == "weight" else (("units", "copy"),)
    if module == "o":
        return (hidden_out, ("units", "split")) if kind == "weight" else (hidden_out,)
    if module == "up":
        return (("ff", "copy"), hidden_in) if kind == "weight" else (("ff", "copy"),)
    if module == "down":
        return (hidden_out, ("ff", "split")) if kind == "weight" else (hidden_out,)
    if kind in ("attn_gain", "mlp_gain"):
        return ()
    raise KeyError(f"no growth rule for parameter {name!r}")


@dataclass(frozen=True)
class WidthMaps:
    hidden: torch.Tensor  # (d_model',) old hidden unit of each new one
    heads: torch.Tensor  # (n_heads',) old head of each new one
    ff: torch.Tensor  # (d_ff',) old MLP unit of each new one
    d_head: int

    @property
    def units(self) -> torch.Tensor:
        """(n_heads' · d_head,) the old attention unit of each new one: whole heads move together."""
        return (self.heads[:, None] * self.d_head + torch.arange(self.d_head)).reshape(-1)

    def of(self, kind: str) -> torch.Tensor:
        return self.units if kind == "units" else getattr(self, kind)


def width_mapping(old: int, new: int, generator: torch.Generator) -> torch.Tensor:
    """g (new,): the identity on the first ``old`` indices, then whole random permutations of the old units, so
    that every old unit has the same number of copies whenever ``new`` is a multiple of ``old``."""
    rounds = -(-(new - old) // old)  # ceil
    extra = [torch.randperm(old, generator=generator) for _ in range(rounds)]
    return torch.cat([torch.arange(old), *extra])[:new]


def _check_width(model: object, d_model: int, n_heads: int, d_ff: int) -> TinyTransformerConfig:
    if not isinstance(model, TinyTransformer):
        raise TypeError(f"model must be an effref TinyTransformer, got {type(model).__name__}")
    cfg = model.cfg
    for name, new, old in (("d_model", d_model, cfg.d_model), ("n_heads", n_heads, cfg.n_heads),
                           ("d_ff", d_ff, cfg.d_ff)):
        if isinstance(new, bool) or not isinstance(new, int):
            raise TypeError(f"{name} must be an int, got {type(new).__name__}")
        if new < old:
            raise ValueError(f"{name}={new} is smaller than the model's {old}: growth cannot shrink a model; "
                             f"pass {name} ≥ {old}")
    return cfg


def width_maps(cfg: TinyTransformerConfig, d_model: int, n_heads: int, d_ff: int, seed: int = 0) -> WidthMaps:
    """The mappings g that ``fpi_widen`` / ``aki_widen`` draw for this growth with this ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return WidthMaps(hidden=width_mapping(cfg.d_model, d_model, generator),
                     heads=width_mapping(cfg.n_heads, n_heads, generator),
                     ff=width_mapping(cfg.d_ff, d_ff, generator), d_head=cfg.d_head)


def expand(tensor: torch.Tensor, axes: tuple[Axis, ...], maps: WidthMaps) -> torch.Tensor:
    """FPI on one tensor: copy along every "copy" axis, copy and divide by the copy count along "split" axes."""
    for dim, axis in enumerate(axes):
        if axis is None:
            continue
        kind, role = axis
        g = maps.of(kind)
        tensor = tensor.index_select(dim, g)
        if role == "split":
            copies = torch.bincount(g)[g].to(tensor.dtype)  # C(g(i)) for every new index i
            tensor = tensor / copies.view([-1 if d == dim else 1 for d in range(tensor.ndim)])
    return tensor


def new_units_mask(axes: tuple[Axis, ...], shape: torch.Size, cfg: TinyTransformerConfig) -> torch.Tensor:
    """True where an output ("copy") index of a grown block tensor is a new unit (index ≥ the old size)."""
    old = {"hidden": cfg.d_model, "units": cfg.n_heads * cfg.d_head, "ff": cfg.d_ff}
    mask = torch.zeros(shape, dtype=torch.bool)
    for dim, axis in enumerate(axes):
        if axis is not None and axis[1] == "copy":
            new = torch.arange(shape[dim]) >= old[axis[0]]
            mask |= new.view([-1 if d == dim else 1 for d in range(len(shape))])
    return mask


def _widen(model: TinyTransformer, d_model: int, n_heads: int, d_ff: int, seed: int,
           advanced: bool) -> TinyTransformer:
    cfg = _check_width(model, d_model, n_heads, d_ff)
    maps = width_maps(cfg, d_model, n_heads, d_ff, seed)
    small = model.state_dict()
    state = {}
    for name, tensor in small.items():
        axes = parameter_axes(name)
        state[name] = expand(tensor, axes, maps)
        if advanced and name.startswith("blocks.") and axes:
            layer = int(name.split(".")[1])
            upper = name.replace(f"blocks.{layer}.", f"blocks.{min(layer + 1, cfg.n_layers - 1)}.", 1)
            from_upper = expand(small[upper], axes, maps)  # AKI: block l + 1's weights, FPI-expanded
            state[name] = torch.where(new_units_mask(axes, state[name].shape, cfg), from_upper, state[name])
    grown = TinyTransformer(replace(cfg, d_model=d_model, n_heads=n_heads, d_ff=d_ff))
    grown.load_state_dict(state)
    return grown.to(next(model.parameters()).device)


def fpi_widen(model: TinyTransformer, d_model: int, n_heads: int, d_ff: int, seed: int = 0) -> TinyTransformer:
    """A wider copy of ``model`` (unchanged) computing the same function: bert2BERT's FPI.

    Exact to float rounding when ``d_model`` is a multiple of the model's (or the model has no LayerNorm); every
    new unit is a copy of an old one, drawn by ``seed`` (``width_maps`` returns the mapping).
    """
    return _widen(model, d_model, n_heads, d_ff, seed, advanced=False)


def aki_widen(model: TinyTransformer, d_model: int, n_heads: int, d_ff: int, seed: int = 0) -> TinyTransformer:
    """A wider copy of ``model`` whose new output units in block l come from block l + 1: bert2BERT's AKI.

    Not function-preserving by design; embeddings, the head and the old units are exactly as in FPI.
    """
    return _widen(model, d_model, n_heads, d_ff, seed, advanced=True)
