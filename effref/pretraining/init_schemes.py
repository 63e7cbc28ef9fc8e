"""Initialisations that let deep residual transformers train without warm-up: Fixup, SkipInit, ReZero, DeepNorm.

Papers: Zhang, Dauphin, Ma (2019), "Fixup Initialization", arXiv:1901.09321 (§3, the three rules);
De & Smith (2020), "Batch Normalization Biases Residual Blocks Towards the Identity Function in Deep Networks",
arXiv:2002.10444 (§4, SkipInit); Bachlechner, Majumder, Mao, Cottrell, McAuley (2021), "ReZero is All You Need",
arXiv:2003.04887 (Eq. 5); Wang, Ma, Dong, Huang, Zhang, Wei (2022), "DeepNet: Scaling Transformers to 1,000
Layers", arXiv:2203.00555 (Eq. in §2 and Figure 2, the decoder-only constants).
Implements, on ``TinyTransformer`` with L blocks (2L residual branches F: attention and MLP):
  Fixup     no normalisation, x ← x + g·F(x) with g a scalar multiplier starting at 1; the last linear of every
            branch (attention ``o``, MLP ``down``) and the output head start at 0; the other linears of a branch
            are scaled by (2L)^(-1/(2m-2)) with m = 2 linears per branch, i.e. by (2L)^(-1/2).
  SkipInit  no normalisation, x ← x + α·F(x) with a learnable α per branch, starting at α₀ = 0 (the paper
            allows a small constant; pass ``alpha``).
  ReZero    no normalisation, x ← x + α·F(x) with α = 0 at the start, one α per block shared by its two branches
            (as in the paper's transformer layer).
  DeepNorm  post-LN with an up-weighted skip, x ← LN(α·x + F(x)), and the value, output and MLP weights drawn
            from Xavier-normal with gain β (queries and keys with gain 1); for a decoder-only model of N blocks
            α = (2N)^(1/4),  β = (8N)^(-1/4).
The first three start every block as the identity, so the signal and its gradient pass a deep stack unchanged;
DeepNorm keeps LayerNorm but bounds each update of the model's function by shrinking branches and growing skips.
Glossary: L = N ``cfg.n_layers`` · m linears per branch · g, α the residual gain (``attn_gain``, ``mlp_gain``)
          · α of DeepNorm ``skip_scale`` · β ``deepnorm_constants(N)[1]``.
Simplified: Fixup's scalar biases before every linear and activation are left out (our linears have their own
          vector biases, which play that part); Fixup's "standard initialisation" is the model's N(0, 0.02²).
          On a transformer SkipInit and ReZero differ only in sharing α and in α₀: the two papers arrived at the
          same idea for ResNets and transformers.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from effref.pretraining.growth.transformer import TinyTransformer, TinyTransformerConfig


def _config(cfg: object) -> TinyTransformerConfig:
    if not isinstance(cfg, TinyTransformerConfig):
        raise TypeError(f"cfg must be a TinyTransformerConfig, got {type(cfg).__name__}; pass e.g. "
                        "TinyTransformerConfig(n_layers=32, d_model=32)")
    return cfg


def post_ln(cfg: TinyTransformerConfig) -> TinyTransformer:
    """The baseline: the original post-LN transformer, x ← LN(x + F(x)), with GPT-2's N(0, 0.02²) init."""
    return TinyTransformer(replace(_config(cfg), norm="post", residual_gain=False, skip_scale=1.0))


def pre_ln(cfg: TinyTransformerConfig) -> TinyTransformer:
    """The usual fix: x ← x + F(LN(x)) with a final LayerNorm (GPT-2)."""
    return TinyTransformer(replace(_config(cfg), norm="pre", residual_gain=False, skip_scale=1.0))


def fixup(cfg: TinyTransformerConfig) -> TinyTransformer:
    """A norm-free model initialised by Fixup's rules (branch ends and head at 0, branch inputs scaled)."""
    model = TinyTransformer(replace(_config(cfg), norm="none", residual_gain=True, skip_scale=1.0))
    scale = (2 * cfg.n_layers) ** (-1 / (2 * 2 - 2))  # (L)^(-1/(2m-2)), L = 2N branches, m = 2
    with torch.no_grad():
        for block in model.blocks:
            for linear in (block.attn.q, block.attn.k, block.attn.v, block.mlp.up):
                linear.weight.mul_(scale)
            for linear in (block.attn.o, block.mlp.down):
                linear.weight.zero_()
        model.head.weight.zero_()
    return model


def skipinit(cfg: TinyTransformerConfig, alpha: float = 0.0) -> TinyTransformer:
    """A norm-free model whose every residual branch is multiplied by a learnable α starting at ``alpha``."""
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha!r} must be a number in [0, 1] (0, or a small constant such as 0.1)")
    model = TinyTransformer(replace(_config(cfg), norm="none", residual_gain=True, skip_scale=1.0))
    with torch.no_grad():
        for block in model.blocks:
            block.attn_gain.fill_(alpha)
            block.mlp_gain.fill_(alpha)
    return model


def rezero(cfg: TinyTransformerConfig) -> TinyTransformer:
    """A norm-free model with one learnable α = 0 per block, shared by its attention and MLP branches."""
    model = TinyTransformer(replace(_config(cfg), norm="none", residual_gain=True, skip_scale=1.0))
    for block in model.blocks:
        block.attn_gain = nn.Parameter(torch.zeros(()))
        block.mlp_gain = block.attn_gain  # one parameter, registered under both names
    return model


def deepnorm_constants(n_layers: int) -> tuple[float, float]:
    """(α, β) of DeepNorm for a decoder-only model with ``n_layers`` blocks: ((2N)^(1/4), (8N)^(-1/4))."""
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers={n_layers!r} must be a positive integer")
    return (2 * n_layers) ** 0.25, (8 * n_layers) ** -0.25


def deepnorm(cfg: TinyTransformerConfig) -> TinyTransformer:
    """A post-LN model with DeepNorm's up-weighted skip α and its β-scaled Xavier initialisation."""
    alpha, beta = deepnorm_constants(_config(cfg).n_layers)
    model = TinyTransformer(replace(cfg, norm="post", residual_gain=False, skip_scale=alpha))
    for block in model.blocks:
        for linear, gain in ((block.attn.q, 1.0), (block.attn.k, 1.0), (block.attn.v, beta), (block.attn.o, beta),
                             (block.mlp.up, beta), (block.mlp.down, beta)):
            nn.init.xavier_normal_(linear.weight, gain=gain)
    return model


SCHEMES = {"post-LN": post_ln, "pre-LN": pre_ln, "DeepNorm": deepnorm, "ReZero": rezero, "SkipInit": skipinit,
           "Fixup": fixup}  # name -> builder(cfg) of a freshly initialised model
