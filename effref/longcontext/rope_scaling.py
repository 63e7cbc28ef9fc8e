"""Scaled RoPE: position interpolation, NTK-aware scaling, dynamic NTK and YaRN.

Papers: Chen, Wong, Chen, Tian (2023), "Extending Context Window of Large Language Models via Positional
Interpolation", arXiv:2306.15595 (PI); bloc97 (2023), "NTK-Aware Scaled RoPE", Reddit r/LocalLLaMA
(the base change; its dynamic form by emozilla, as YaRN §3.3 writes it); Peng, Quesnelle, Fan, Shippole
(2023), "YaRN: Efficient Context Window Extension of Large Language Models", arXiv:2309.00071 — §3.2
(NTK-by-parts ramp), §3.4 (temperature).
Implements: RoPE turns pair i of a query or key at position m by the angle m·θ_i, θ_i = θ^(−2i/d); a model
trained on L positions has seen angles up to L·θ_i only. To run at L' = s·L each method changes θ_i:
  linear (PI)  θ_i / s: position m is read as m / s, so every angle stays inside the trained range;
  ntk          base θ' = θ · s^(d/(d−2)): the fastest pair (i = 0) is untouched, the slowest (i = d/2 − 1)
               is divided by exactly s, the pairs between by less (high frequencies extrapolate);
  dynamic      ntk with s' = s · max(T, L)/L − (s − 1) for the current length T (no change while T ≤ L);
  yarn         per pair, by r_i = L / λ_i, the turns pair i makes over L (λ_i = 2π/θ_i its wavelength):
               h(θ_i) = (1 − γ_i) θ_i / s + γ_i θ_i, γ_i = 1 (keep) when r_i > β_fast = 32, 0 (interpolate)
               when r_i < β_slow = 1, linear between, plus the attention temperature √(1/t) = 0.1 ln s + 1
               multiplying cos and sin (so q·k by (0.1 ln s + 1)²).
  llama3       Llama 3.1's bands: keep θ_i for wavelengths λ_i < L / high_freq_factor, θ_i / s above
               L / low_freq_factor, between them γ_i linear in the turns L / λ_i.
The arithmetic lives one floor down, in effref/models/llama.py (``RopeScaling``, ``scaled_inv_freq``,
``rope_tables``), so that ``Llama.from_hf`` converts scaled checkpoints itself; this module re-exports it, puts
the tables into a model already built (``use_rope_scaling``), and configures a transformers LLaMA with the same
settings (``hf_rope_kwargs``).
Glossary: d d_head · θ rope_theta, the base · θ_i inverse frequency of pair i · s factor · L original_len, the
          trained context · T current length · β_fast, β_slow YaRN's ramp ends (turns over L) · γ_i YaRN's share
          kept from the original θ_i · t YaRN's softmax temperature (attention_factor = √(1/t)).
Note: YaRN's paper ramps γ linearly in r_i; its released code (and transformers) ramps linearly in the pair
      index i between the pairs where r = β_fast and r = β_slow (rounded outwards with ``truncate``). We follow
      the code, so that the tables equal those of the checkpoints people run.
Left out: Code LLaMA's base change alone (it is ``ntk`` at a chosen θ'), LongRoPE's per-pair factors, partial rotary dimensions, and a dynamic scale recomputed on every decoding step (our tables
          are built once for a length; rebuild them for another).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from effref.longcontext.positions import install_rope_tables
from effref.models.llama import (ROPE_KINDS, Llama, RopeScaling, _check_rope, dynamic_factor, llama3_keep,
                                 ntk_theta, require_llama, rope_inv_freq, rope_tables, scaled_inv_freq,
                                 scaling_from_hf, yarn_attention_factor, yarn_keep)

KINDS = ROPE_KINDS
__all__ = ["KINDS", "RopeScaling", "dynamic_factor", "hf_rope_kwargs", "llama3_keep", "ntk_theta",
           "rope_inv_freq", "scaled_inv_freq", "scaled_rope_tables", "scaling_from_hf", "use_rope_scaling",
           "yarn_attention_factor", "yarn_keep"]


def scaled_rope_tables(d_head: int, max_len: int, theta: float,
                       scaling: RopeScaling) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (max_len, d_head) in our Llama's rotate-half layout, the attention factor folded in."""
    return rope_tables(d_head, max_len, theta, scaling)


def use_rope_scaling(model: Llama, scaling: RopeScaling, max_len: int) -> Llama:
    """Run ``model`` (in place) with ``scaling`` for inputs of up to ``max_len`` tokens; returns the model.

    The model's own θ and head size are used; the weights do not change, so ``RopeScaling()`` (kind "none")
    with the trained length restores the original. ``dynamic`` is built for a ``max_len``-token sequence.
    """
    require_llama(model, "model")
    if not isinstance(scaling, RopeScaling):
        raise TypeError(f"scaling must be a RopeScaling, got {type(scaling).__name__}; e.g. "
                        "RopeScaling('yarn', factor=4.0, original_len=2048)")
    cos, sin = scaled_rope_tables(model.cfg.d_head, max_len, model.cfg.rope_theta, scaling)
    install_rope_tables(model, cos, sin)
    model.cfg = dataclasses.replace(model.cfg, rope_scaling=scaling)
    return model


def hf_rope_kwargs(scaling: RopeScaling, theta: float, d_head: int) -> dict:
    """Keyword arguments for a transformers (5.x) LLaMA-family config that make its RoPE equal to ours:
    ``LlamaConfig(**base, **hf_rope_kwargs(...))`` or ``from_pretrained(path, **hf_rope_kwargs(...))``.

    transformers has no static NTK type; NTK-aware scaling is the default RoPE with base θ'.
    """
    _check_rope(d_head, theta)
    s, L = float(scaling.factor), scaling.original_len
    params: dict = {"rope_type": "default", "rope_theta": float(theta)}
    if scaling.kind == "ntk":
        params["rope_theta"] = ntk_theta(theta, d_head, s)
    elif scaling.kind in ("linear", "dynamic", "yarn", "llama3"):
        params |= {"rope_type": scaling.kind, "factor": s}
    kwargs: dict = {"rope_parameters": params}
    if scaling.kind == "dynamic":
        kwargs["max_position_embeddings"] = L  # transformers' dynamic type reads L from here
    elif scaling.kind == "yarn":
        params |= {"original_max_position_embeddings": L, "beta_fast": float(scaling.beta_fast),
                   "beta_slow": float(scaling.beta_slow), "truncate": scaling.truncate}
        if scaling.attention_factor is not None:
            params["attention_factor"] = float(scaling.attention_factor)
        kwargs["max_position_embeddings"] = math.ceil(s * L)
    elif scaling.kind == "llama3":
        params |= {"original_max_position_embeddings": L, "low_freq_factor": float(scaling.low_freq_factor),
                   "high_freq_factor": float(scaling.high_freq_factor)}
        kwargs["max_position_embeddings"] = math.ceil(s * L)
    elif L is not None:
        kwargs["max_position_embeddings"] = math.ceil(s * L)
    return kwargs
