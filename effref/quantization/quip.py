"""QuIP-style incoherence processing: random orthogonal rotations around GPTQ (= LDLQ) rounding.

Paper: Chee, Cai, Kuleshov, De Sa (2023), "QuIP: 2-Bit Quantization of Large Language Models With
Guarantees", arXiv:2307.13304 — §4 (incoherence processing, Kronecker-product orthogonal matrices) and
Theorem 6 (LDLQ is GPTQ); randomized Hadamard rotations as in QuIP# (Tseng et al., 2024, arXiv:2402.04396).
Implements: with orthogonal U (d_out × d_out) and V (d_in × d_in), the layer loss is unchanged by
    W̃ = U W Vᵀ,   H̃ = V H Vᵀ,   tr((W̃ − Ŵ̃) H̃ (W̃ − Ŵ̃)ᵀ) = tr((W − Uᵀ Ŵ̃ V) H (W − Uᵀ Ŵ̃ V)ᵀ),
and y = W x = Uᵀ W̃ V x exactly (function-preserving before rounding). Random U, V spread every large
weight and every large Hessian direction over all coordinates ("incoherence"), so a uniform grid fits
W̃ far better than W; W̃ is rounded with GPTQ on H̃ and the layer computes with Uᵀ Ŵ̃ V. The rotations live
inside the layer (no other module changes, so any family works); before rounding, Uᵀ W̃ V is checked to give
back W on every layer before the first one changes.
Rotations are Kronecker products R = (F₀ ⊗ F₁ ⊗ …)·diag(±1), applied in O(n·Σ dim Fᵢ) without forming R:
  "orthogonal": two Haar-random orthogonal factors of sizes p·q = n (p, q near √n), as in QuIP;
  "hadamard":   normalised Hadamard factors (Sylvester 2^k and Paley's order 12) with random signs, for
                n = 12^m · 2^k (SmolLM2's 576 = 12·12·4 and 1536 = 12·128 qualify).
Glossary: U, V output / input rotations · W̃, H̃ rotated weight and Hessian · Ŵ̃ its quantization · F factors.
Left out: QuIP's diagonal rescaling and its greedy-update refinement, QuIP#'s lattice codebooks and fine-tuning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from effref.checks import calibration_or_none, config_or_default
from effref.quantization.driver import LayerInputs, check_layer_function, group_check, quantize_model
from effref.quantization.gptq import GPTQConfig, gptq_quantize
from effref.quantization.linear import QuantLinear
from effref.quantization.rotations import hadamard_factors, kron_right, unrotate_weight

ROTATIONS = ("orthogonal", "hadamard")
Rotation = tuple[list[torch.Tensor], torch.Tensor]  # (Kronecker factors, signs): R = (⊗F)·diag(signs)


@dataclass
class QuIPConfig:
    gptq: GPTQConfig = field(default_factory=GPTQConfig)  # the rounding inside the rotations (bits, groups)
    rotation: str = "orthogonal"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation={self.rotation!r} is not known; use one of {ROTATIONS}")


def _random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()  # sign fix makes the draw Haar-uniform


def random_rotation(n: int, kind: str = "orthogonal", generator: torch.Generator | None = None) -> Rotation:
    """A random orthogonal R = (F₀ ⊗ F₁ …)·diag(signs) of order ``n``, as (factors, signs)."""
    generator = generator or torch.Generator().manual_seed(0)
    if kind == "hadamard":
        factors = hadamard_factors(n)
    elif kind == "orthogonal":
        p = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)  # the divisor closest to √n from below
        factors = [_random_orthogonal(p, generator), _random_orthogonal(n // p, generator)]
    else:
        raise ValueError(f"kind={kind!r} is not known; use one of {ROTATIONS}")
    signs = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
    return factors, signs.to(torch.int8)


def rotate(x: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """x Rᵀ (each row of x multiplied by Rᵀ, i.e. R applied to row vectors), with R = (⊗F)·diag(signs)."""
    factors, signs = rot
    return kron_right(x * signs.to(x), [f.T for f in factors])  # x D (⊗F)ᵀ


def incoherence_process(w: torch.Tensor, hessian: torch.Tensor, rot_out: Rotation,
                        rot_in: Rotation) -> tuple[torch.Tensor, torch.Tensor]:
    """W̃ = U W Vᵀ (R, C) and H̃ = V H Vᵀ (C, C)."""
    w_t = rotate(rotate(w.float(), rot_in).T, rot_out).T  # U (W Vᵀ)
    h_t = rotate(rotate(hessian.float(), rot_in).T, rot_in).T  # V (H Vᵀ)
    return w_t, (h_t + h_t.T) / 2  # symmetric up to rounding


def layer_rotations(shape: tuple[int, int], cfg: QuIPConfig) -> tuple[Rotation, Rotation]:
    """(U, V) for a weight of ``shape`` (R, C): the same draw for the same seed, so a check sees what is used."""
    generator = torch.Generator().manual_seed(cfg.seed)
    return random_rotation(shape[0], cfg.rotation, generator), random_rotation(shape[1], cfg.rotation, generator)


def rotation_check(cfg: QuIPConfig) -> Callable[[str, nn.Linear], None]:
    """A ``check`` for the walk, run on every layer before any changes: the group size fits, a rotation of
    each side exists, and Uᵀ (U W Vᵀ) V gives back W (so the rotated layer computes the same function)."""
    groups = group_check(cfg.gptq.quant)

    def check(name: str, linear: nn.Linear) -> None:
        groups(name, linear)
        rot_out, rot_in = layer_rotations(tuple(linear.weight.shape), cfg)
        w = linear.weight.detach().float()
        w_t = rotate(rotate(w, rot_in).T, rot_out).T  # U W Vᵀ
        check_layer_function(w, unrotate_weight(w_t, rot_in, rot_out), f"{name}: QuIP's rotations")
    return check


def quip_quantize(w: torch.Tensor, hessian: torch.Tensor, cfg: QuIPConfig | None = None) -> dict:
    """Rotate, round with GPTQ on H̃, and return ``{"qtensor", "rot_in", "rot_out", "loss"}`` for W (R, C)."""
    cfg = config_or_default(cfg, QuIPConfig, "QuIPConfig(GPTQConfig(QuantConfig(bits=2)))")
    rot_out, rot_in = layer_rotations(tuple(w.shape), cfg)
    w_t, h_t = incoherence_process(w.detach(), hessian, rot_out, rot_in)
    out = gptq_quantize(w_t, h_t, cfg.gptq)
    if cfg.rotation == "hadamard":  # QuantLinear rebuilds Hadamard factors: store the signs only
        rot_out, rot_in = ("hadamard", rot_out[1]), ("hadamard", rot_in[1])
    return {**out, "rot_in": rot_in, "rot_out": rot_out}


def quip_layer(linear: nn.Linear, stats: LayerInputs, cfg: QuIPConfig | None = None) -> QuantLinear:
    """Layer-level QuIP: a QuantLinear storing Q(U W Vᵀ) and the rotations (factors + signs)."""
    cfg = config_or_default(cfg, QuIPConfig, "QuIPConfig(GPTQConfig(QuantConfig(bits=2)))")
    if stats is None or stats.hessian is None:
        raise ValueError("QuIP needs the Hessian of the layer's inputs; run it through quip_model with "
                         "calib_batches, or pass LayerInputs with hessian set")
    out = quip_quantize(linear.weight, stats.hessian, cfg)
    return QuantLinear.from_linear(linear, out["qtensor"], rot_in=out["rot_in"], rot_out=out["rot_out"])


def quip_model(model: nn.Module, calib_batches: torch.Tensor, cfg: QuIPConfig | None = None, **driver) -> nn.Module:
    """Model-level QuIP over every linear of every block; returns the model, changed in place.

    ``**driver`` goes to ``quantize_model``: ``target`` (which linears), ``block_ids``, ``batch_size``,
    ``max_samples``, ``seed``, ``progress`` and ``stats`` (shared calibration statistics).
    """
    calib_batches = calibration_or_none(calib_batches, "quip_model")
    cfg = config_or_default(cfg, QuIPConfig, "QuIPConfig(GPTQConfig(QuantConfig(bits=2)))")
    return quantize_model(model, lambda name, linear, stats: quip_layer(linear, stats, cfg), calib_batches,
                          needs=("hessian",), desc="QuIP", check=rotation_check(cfg), **driver)
