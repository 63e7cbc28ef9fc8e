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
The tables drop into our Llama (``use_rope_scaling``) and the same settings configure a transformers LLaMA
(``hf_rope_kwargs``).
Glossary: d d_head · θ rope_theta, the base · θ_i inverse frequency of pair i · s factor · L original_len, the
          trained context · T current length · β_fast, β_slow YaRN's ramp ends (turns over L) · γ_i YaRN's share
          kept from the original θ_i · t YaRN's softmax temperature (attention_factor = √(1/t)).
Note: YaRN's paper ramps γ linearly in r_i; its released code (and transformers) ramps linearly in the pair
      index i between the pairs where r = β_fast and r = β_slow (rounded outwards with ``truncate``). We follow
      the code, so that the tables equal those of the checkpoints people run.
Left out: Code LLaMA's base change alone (it is ``ntk`` at a chosen θ'), Llama 3's and LongRoPE's per-band
          factors, partial rotary dimensions, and a dynamic scale recomputed on every decoding step (our tables
          are built once for a length; rebuild them for another).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from effref.longcontext.positions import install_rope_tables
from effref.models.llama import Llama, require_llama

if TYPE_CHECKING:
    import transformers

KINDS = ("none", "linear", "ntk", "dynamic", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """How to stretch RoPE from ``original_len`` trained positions by ``factor`` (kind: one of ``KINDS``)."""

    kind: str = "none"
    factor: float = 1.0  # s = target length / trained length
    original_len: int | None = None  # L; needed by dynamic and yarn
    beta_fast: float = 32.0  # yarn: pairs turning more than this over L keep θ_i
    beta_slow: float = 1.0  # yarn: pairs turning less than this over L are interpolated
    attention_factor: float | None = None  # yarn: None = 0.1 ln s + 1
    truncate: bool = True  # yarn: round the ramp's ends outwards to whole pairs, as the released code

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not known; use one of {KINDS} (linear = position "
                             "interpolation)")
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) or not self.factor >= 1:
            raise ValueError(f"factor={self.factor!r} must be a number >= 1: the target context divided by the "
                             "trained one (e.g. 4.0 to run a 2048-token model at 8192); < 1 would shrink it")
        if self.kind in ("dynamic", "yarn") and self.original_len is None:
            raise ValueError(f"kind={self.kind!r} needs original_len, the context length the model was trained "
                             "with (e.g. original_len=2048)")
        if self.original_len is not None and (isinstance(self.original_len, bool) or
                                               not isinstance(self.original_len, int) or self.original_len < 1):
            raise ValueError(f"original_len={self.original_len!r} must be a positive integer: the context "
                             "length the model was trained with")
        if not 0 < self.beta_slow < self.beta_fast:
            raise ValueError(f"beta_slow={self.beta_slow}, beta_fast={self.beta_fast}: need 0 < beta_slow < "
                             "beta_fast (the paper's 1 and 32)")
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ValueError(f"attention_factor={self.attention_factor!r} must be positive, or None for "
                             "0.1 ln(factor) + 1")


def _check_rope(d_head: int, theta: float) -> None:
    if isinstance(d_head, bool) or not isinstance(d_head, int) or d_head < 4 or d_head % 2:
        raise ValueError(f"d_head={d_head!r} must be an even integer >= 4 (RoPE turns pairs; NTK's exponent "
                         "d/(d−2) needs d > 2)")
    if not (isinstance(theta, (int, float)) and math.isfinite(theta) and theta > 1):
        raise ValueError(f"theta={theta!r} must be a finite RoPE base > 1, e.g. 10000.0")


def rope_inv_freq(d_head: int, theta: float) -> torch.Tensor:
    """θ_i = θ^(−2i/d) for the d/2 pairs, (d_head/2,): the angle per position of each pair."""
    _check_rope(d_head, theta)
    return 1.0 / theta ** (torch.arange(0, d_head, 2, dtype=torch.int64).float() / d_head)  # (d_head/2,)


def ntk_theta(theta: float, d_head: int, factor: float) -> float:
    """NTK-aware base θ' = θ · s^(d/(d−2)), which divides the slowest pair's θ_i by exactly s."""
    return theta * factor ** (d_head / (d_head - 2))


def dynamic_factor(factor: float, original_len: int, seq_len: int) -> float:
    """Dynamic NTK's scale for the current length T: s · max(T, L)/L − (s − 1), = 1 while T ≤ L."""
    return factor * max(seq_len, original_len) / original_len - (factor - 1)


def yarn_attention_factor(factor: float) -> float:
    """YaRN's temperature (§3.4): √(1/t) = 0.1 ln s + 1, the factor on cos and sin (1 when s ≤ 1)."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def yarn_keep(d_head: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """γ_i (d_head/2,): 1 where pair i keeps θ_i (extrapolates), 0 where it takes θ_i / s (interpolates)."""
    _check_rope(d_head, theta)
    L = scaling.original_len

    def pair_with_turns(turns: float) -> float:  # solve L / λ_i = turns for i, with λ_i = 2π θ^(2i/d)
        return d_head * math.log(L / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_with_turns(scaling.beta_fast), pair_with_turns(scaling.beta_slow)  # low < high
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d_head - 1)
    if low == high:
        high += 0.001  # a one-pair ramp
    ramp = ((torch.arange(d_head // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # 0 → 1 with i
    return 1 - ramp  # (d_head/2,)


def scaled_inv_freq(d_head: int, theta: float, scaling: RopeScaling,
                    seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """The inverse frequencies (d_head/2,) and the factor on cos/sin of ``scaling``; ``seq_len`` (the length of
    the sequence the tables serve) matters for ``dynamic`` only (None: original_len, i.e. unscaled)."""
    base = rope_inv_freq(d_head, theta)  # (d_head/2,)
    s = float(scaling.factor)
    if scaling.kind == "none":
        return base, 1.0
    if scaling.kind == "linear":
        return base / s, 1.0  # PI: f(x, m / s) turns pair i by (m / s) θ_i
    if scaling.kind == "ntk":
        return rope_inv_freq(d_head, ntk_theta(theta, d_head, s)), 1.0
    if scaling.kind == "dynamic":
        length = scaling.original_len if seq_len is None else seq_len
        s_now = dynamic_factor(s, scaling.original_len, length)
        return rope_inv_freq(d_head, ntk_theta(theta, d_head, s_now)), 1.0
    keep = yarn_keep(d_head, theta, scaling)  # kind == "yarn"
    inv_freq = base / s * (1 - keep) + base * keep  # h(θ_i) = (1 − γ_i) θ_i / s + γ_i θ_i
    mscale = yarn_attention_factor(s) if scaling.attention_factor is None else float(scaling.attention_factor)
    return inv_freq, mscale


def scaled_rope_tables(d_head: int, max_len: int, theta: float,
                       scaling: RopeScaling) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (max_len, d_head) in our Llama's rotate-half layout, the attention factor folded in."""
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len={max_len!r} must be a positive integer: the longest input, in tokens")
    inv_freq, mscale = scaled_inv_freq(d_head, theta, scaling, seq_len=max_len)  # (d_head/2,)
    angles = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (max_len, d_head/2)
    angles = torch.cat([angles, angles], dim=-1)  # (max_len, d_head): pair i in columns i and i + d/2
    return angles.cos() * mscale, angles.sin() * mscale


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
    return install_rope_tables(model, cos, sin)


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
    elif scaling.kind in ("linear", "dynamic", "yarn"):
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
    elif L is not None:
        kwargs["max_position_embeddings"] = math.ceil(s * L)
    return kwargs


def scaling_from_hf(hf_config: transformers.PretrainedConfig) -> RopeScaling:
    """The ``RopeScaling`` of a transformers config (``rope_parameters``, or v4's ``rope_scaling``)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return RopeScaling()
    if kind not in ("linear", "dynamic", "yarn") or params.get("mscale") or params.get("mscale_all_dim"):
        raise ValueError(f"rope_type {kind!r} with {sorted(params)} is not implemented here; effref.longcontext "
                         "reads linear, dynamic and yarn (without DeepSeek's mscale)")
    if kind == "linear":
        return RopeScaling("linear", float(params["factor"]))
    if kind == "dynamic":
        return RopeScaling("dynamic", float(params["factor"]), original_len=hf_config.max_position_embeddings)
    return RopeScaling("yarn", float(params["factor"]), original_len=int(params["original_max_position_embeddings"]),
                       beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                       attention_factor=params.get("attention_factor"), truncate=params.get("truncate", True))


def llama_from_hf_scaled(hf_model: transformers.PreTrainedModel, max_len: int | None = None) -> Llama:
    """Our Llama from a transformers LLaMA-family model whose config scales RoPE (linear, dynamic, yarn), with
    the same tables; ``max_len`` defaults to the config's ``max_position_embeddings`` (for ``dynamic`` that is
    the trained length, where nothing is scaled yet: pass the length you will run at).

    ``Llama.from_hf`` converts default-RoPE models only: it is given the config with the default RoPE, and the
    scaled tables are installed afterwards.
    """
    config = getattr(hf_model, "config", None)
    if config is None:
        raise ValueError(f"hf_model must be a transformers causal LM, got {type(hf_model).__name__}")
    scaling = scaling_from_hf(config)
    theta = float((getattr(config, "rope_parameters", None) or {}).get("rope_theta",
                                                                    getattr(config, "rope_theta", 10000.0)))
    plain = copy.deepcopy(config)
    plain.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    hf_model.config = plain  # from_hf reads the config; the weights are the same either way
    try:
        model = Llama.from_hf(hf_model)
    finally:
        hf_model.config = config
    return use_rope_scaling(model, scaling, max_len or config.max_position_embeddings)
