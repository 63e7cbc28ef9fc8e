"""Depth growth: progressive stacking, and its function-preserving variant.

Papers: Gong, He, Li, Qin, Wang, Liu (2019), "Efficient Training of BERT by Progressively Stacking", ICML 2019
(§3, Algorithm 1); bert2BERT (Chen et al. 2022, arXiv:2110.07143) grows depth the same way after widening.
Implements, for a small model with blocks B_0 … B_{L-1} grown to L' ≥ L blocks:
  "stack"     B'_i = B_{i mod L}: the trained stack copied on top of itself (Gong et al.: train L/4 blocks,
              stack to L/2, train, stack to L). Not function-preserving: every input now passes through the
              stack twice, and the copies start from knowledge the lower copies already have.
  "identity"  B'_i = B_{⌊i·L/L'⌋} with the output projections (attention ``o``, MLP ``down``) of every copy
              after the first zeroed: a zero branch adds nothing to the residual stream, so the grown model
              computes exactly the small model's function. This needs x + 0 = x, which holds for pre-LN and
              norm-free blocks; a post-LN block would still apply LN(x) ≠ x, so it is refused there.
Glossary: L n_layers of the model · L' the new ``n_layers``.
Left out: the staged schedule itself (the chapter runs it: train, grow, train), MSLT's freezing of lower layers.
"""

from __future__ import annotations

from dataclasses import replace

from effref.pretraining.growth.transformer import TinyTransformer

HOW = ("stack", "identity")
ZEROED = (".attn.o.", ".mlp.down.")  # a residual branch whose last linear is zero adds nothing


def grow_depth(model: TinyTransformer, n_layers: int, how: str = "stack") -> TinyTransformer:
    """A deeper copy of ``model`` (unchanged) with ``n_layers`` blocks, built as ``how`` says."""
    if not isinstance(model, TinyTransformer):
        raise TypeError(f"model must be an effref TinyTransformer, got {type(model).__name__}")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int):
        raise TypeError(f"n_layers must be an int, got {type(n_layers).__name__}")
    old = model.cfg.n_layers
    if n_layers < 1:
        raise ValueError(f"n_layers={n_layers} must be positive")
    if n_layers < old:
        raise ValueError(f"n_layers={n_layers} is fewer than the model's {old} blocks: growth cannot remove "
                         f"blocks; pass n_layers ≥ {old}")
    if how not in HOW:
        raise ValueError(f"how={how!r} is not one of {HOW}")
    if how == "identity" and model.cfg.norm == "post":
        raise ValueError("how='identity' cannot preserve a post-LN model's function (a zeroed branch still "
                         "passes through LayerNorm); use how='stack', or a model with norm='pre' or 'none'")
    small = model.state_dict()
    state = {name: tensor for name, tensor in small.items() if not name.startswith("blocks.")}
    for new in range(n_layers):
        source = new % old if how == "stack" else new * old // n_layers
        repeat = how == "identity" and new > 0 and (new - 1) * old // n_layers == source
        prefix = f"blocks.{source}."
        for name, tensor in small.items():
            if name.startswith(prefix):
                grown_name = f"blocks.{new}." + name[len(prefix):]
                state[grown_name] = tensor.clone()
                if repeat and any(part in grown_name for part in ZEROED):
                    state[grown_name].zero_()
    grown = TinyTransformer(replace(model.cfg, n_layers=n_layers))
    grown.load_state_dict(state)
    return grown.to(next(model.parameters()).device)
