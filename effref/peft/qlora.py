"""QLoRA: LoRA on a frozen base stored in 4-bit NormalFloat (NF4) with double-quantized block scales.

Paper: Dettmers, Pagnoni, Holtzman, Zettlemoyer (2023), "QLoRA: Efficient Finetuning of Quantized LLMs",
arXiv:2305.14314 — §3 (4-bit NormalFloat, Double Quantization, Eq. 5–6), Appendix E (the NF4 values).
Implements:
  NF4 levels. The paper's k-bit quantile rule q_i = ½[Q_N(i/(2^k+1)) + Q_N((i+1)/(2^k+1))] with an exact zero:
    8 positive levels Q_N(p) for p evenly spaced from δ down to ½ (9 points, ½ dropped), 7 negative levels
    −Q_N(p) for p evenly spaced from δ to ½ (8 points, ½ dropped), plus 0; all divided by the largest so they
    span [−1, 1]. Q_N is the standard normal quantile function. The extreme probability δ = ½[(1 − 1/30) +
    (1 − 1/32)] (= 0.96770833…) averages the outermost bin centres for 15 and 16 equal bins, which keeps Q_N
    finite; the paper does not print δ, it is the value of the authors' bitsandbytes code, and with it the 16
    levels reproduce Appendix E to 1e-6 (tests/peft/test_qlora.py).
  Block-wise NF4. The weight is flattened row-major and cut into blocks of B = 64; each block stores its
    absmax c and, per value, the 4-bit index of the level nearest to w / c. Dequantize: w ≈ c · level[index].
  Double quantization (DQ). The block scales c (one fp32 per 64 weights = 0.5 bits/param) are themselves
    quantized: centred by their mean, cut into blocks of 256, stored as 8-bit floats (float8 e4m3) with one
    fp32 scale per 256 of them: 8/64 + 32/(64·256) = 0.127 bits/param (Eq. 6's c₁^FP8 and c₂^FP32).
  QLoRA. Y = X · doubleDequant(c₁, c₂, W^NF4) + X L₁ L₂ (Eq. 6): every target linear becomes an ``NF4Linear``
    (codes and scales are buffers, nothing to train) and is wrapped by ``effref.peft.lora.LoraLinear``.
Glossary: W weight (out × in) · B ``block_size`` (64) · c₁ block absmax (``absmax`` / its fp8 codes)
          · c₂ the fp32 scale of 256 block scales (``absmax_scale``) · μ their mean (``absmax_mean``)
          · level[·] the 16 NF4 values · L₁, L₂ the LoRA matrices (A, B in ``lora.py``).
Left out: paged optimizers (unified-memory paging of optimizer states), bf16 compute and the CUDA
          dequantization kernels; the dequantized weight is rebuilt in the input's dtype at every forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from effref.checks import config_or_default
from effref.peft.core import LLAMA_LINEARS  # noqa: F401  (re-exported: callers import it from here)
from effref.peft.core import find_linears, linear_targets, replace_all, targets_or_default
from effref.peft.lora import LoraConfig, LoraLinear, apply_lora, lora_targets
from effref.quantization.basics import pack, unpack
from effref.runtime import progress_bar

FP8 = torch.float8_e4m3fn  # the 8-bit float of the second quantization level
FP8_MAX = torch.finfo(FP8).max  # 448


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 values in increasing order, from normal quantiles (module docstring), as float32 (16,)."""
    delta = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    positive = torch.special.ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])  # (8,) > 0
    negative = -torch.special.ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])  # (7,) < 0
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values  # (16,)
    return (levels / levels.abs().max()).float()


@dataclass(frozen=True)
class NF4Config:
    block_size: int = 64  # B: weights per absmax
    double_quant: bool = True  # quantize the block scales to fp8 (QLoRA's DQ)
    dq_block_size: int = 256  # block scales per fp32 second-level scale

    def __post_init__(self) -> None:
        for name in ("block_size", "dq_block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer (QLoRA uses 64 and 256)")


def quantize_nf4(w: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise NF4 of ``w``: (indices uint8 (numel,), absmax float32 (numel / block_size,))."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.numel() % block_size:
        raise ValueError(f"block_size={block_size} does not divide w.numel()={w.numel()} (shape "
                         f"{tuple(w.shape)}); pick a divisor such as 64 or pad the weight")
    blocks = w.detach().float().reshape(-1, block_size)  # (n_blocks, B)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,); inf or NaN anywhere in a block shows up here
    if not torch.isfinite(absmax).all():
        raise ValueError("w contains inf or NaN; NF4 needs finite weights")
    normed = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]  # in [-1, 1]
    levels = nf4_levels().to(w.device)
    midpoints = (levels[1:] + levels[:-1]) / 2  # (15,) decision boundaries of nearest-level rounding
    indices = torch.bucketize(normed, midpoints)  # (n_blocks, B) in 0..15
    return indices.reshape(-1).to(torch.uint8), absmax


def dequantize_nf4(indices: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """w ≈ absmax · level[index], float32 of ``shape``."""
    values = nf4_levels().to(absmax.device)[indices.long()].reshape(absmax.numel(), -1)  # (n_blocks, B)
    return (values * absmax.float()[:, None]).reshape(shape)


def double_quantize(absmax: torch.Tensor, block_size: int = 256) -> tuple[torch.Tensor, torch.Tensor,
                                                                            torch.Tensor]:
    """Second-level quantization of the block scales: (fp8 codes as uint8 (n,), fp32 scales (⌈n/256⌉,), mean).

    The scales are centred by their mean μ (they are all positive, and centring uses the fp8 range on both
    sides), padded to whole blocks of ``block_size``, scaled per block so the block's absmax maps to the
    largest fp8 value, and rounded to float8 e4m3.
    """
    mean = absmax.float().mean()  # μ, one fp32 per tensor
    centred = absmax.float() - mean  # (n,)
    n = centred.numel()
    padded = F.pad(centred, (0, (-n) % block_size)).reshape(-1, block_size)  # (n_blocks2, 256)
    scale = padded.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / FP8_MAX  # c₂ (n_blocks2,)
    codes = (padded / scale[:, None]).to(FP8).reshape(-1)[:n]  # c₁^FP8, (n,)
    return codes.view(torch.uint8), scale, mean


def double_dequantize(codes: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, block_size: int = 256
                      ) -> torch.Tensor:
    """Inverse of ``double_quantize``: the block scales c₁ as float32 (n,)."""
    n = codes.numel()
    values = F.pad(codes.view(FP8).float(), (0, (-n) % block_size)).reshape(-1, block_size)  # (n_blocks2, 256)
    return (values * scale[:, None]).reshape(-1)[:n] + mean


def fake_quantize_nf4(w: torch.Tensor, cfg: NF4Config = NF4Config()) -> torch.Tensor:
    """NF4 round trip of ``w`` (with double quantization if ``cfg`` says so): float32 of w's shape."""
    indices, absmax = quantize_nf4(w, cfg.block_size)
    if cfg.double_quant:
        absmax = double_dequantize(*double_quantize(absmax, cfg.dq_block_size), cfg.dq_block_size)
    return dequantize_nf4(indices, absmax, w.shape)


class _FrozenWeightMatmul(torch.autograd.Function):
    """y = x Wᵀ with W dequantized in forward and again in backward, so autograd never keeps a float copy.

    Saving the dequantized W for backward (what F.linear would do) would hold a float32 copy of every frozen
    weight until backward: more memory than the unquantized model. The base is frozen, so backward only needs
    ∂L/∂x = ∂L/∂y · W, and W is cheap to rebuild from its 4-bit codes (QLoRA's kernels do the same).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:
        ctx.layer = layer
        return x @ layer.dequantized_weight().to(x.dtype).T  # (..., in) @ (in, out) -> (..., out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_out @ ctx.layer.dequantized_weight().to(grad_out.dtype), None  # (..., out) @ (out, in)


class NF4Linear(nn.Module):
    """A frozen linear layer stored as packed NF4 codes and (double-quantized) block scales, all buffers."""

    def __init__(self, linear: nn.Linear, cfg: NF4Config = NF4Config()) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear quantizes an nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features, self.cfg = linear.in_features, linear.out_features, cfg
        indices, absmax = quantize_nf4(linear.weight, cfg.block_size)
        self.register_buffer("weight_codes", pack(indices, 4))  # (out·in/2,) two indices per byte
        if cfg.double_quant:
            codes, scale, mean = double_quantize(absmax, cfg.dq_block_size)
            self.register_buffer("absmax_codes", codes)  # (n_blocks,) fp8 bits
            self.register_buffer("absmax_scale", scale)  # (⌈n_blocks/256⌉,) fp32
            self.register_buffer("absmax_mean", mean)  # () fp32
        else:
            self.register_buffer("absmax", absmax)  # (n_blocks,) fp32
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)

    def block_scales(self) -> torch.Tensor:
        """The absmax of every block, float32 (n_blocks,), after double dequantization when DQ is on."""
        if self.cfg.double_quant:
            return double_dequantize(self.absmax_codes, self.absmax_scale, self.absmax_mean,
                                     self.cfg.dq_block_size)
        return self.absmax

    def dequantized_weight(self) -> torch.Tensor:
        """W ≈ doubleDequant(c₁, c₂, W^NF4), float32 (out_features, in_features)."""
        numel = self.in_features * self.out_features
        return dequantize_nf4(unpack(self.weight_codes, 4, numel), self.block_scales(),
                              (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _FrozenWeightMatmul.apply(x, self)  # (..., out_features)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block_size={self.cfg.block_size}, double_quant={self.cfg.double_quant}")


def quantize_model_nf4(model: nn.Module, cfg: NF4Config = NF4Config(),
                       target_modules: tuple[str, ...] | None = None, progress: bool = False) -> nn.Module:
    """Replace every ``nn.Linear`` whose name ends with one of ``target_modules`` by an ``NF4Linear``.

    ``target_modules=None`` takes every linear of the model's blocks (``effref.peft.core.LAYOUTS``). All layers are
    quantized before the first one is swapped in, so a failure leaves the model as it was.
    """
    targets = linear_targets(model, targets_or_default(model, target_modules, "linears"), "NF4")
    for name, layer in targets.items():  # check every layer before changing any
        if layer.weight.numel() % cfg.block_size:
            raise ValueError(f"block_size={cfg.block_size} does not divide the {tuple(layer.weight.shape)} "
                             f"weight of {name}; pick a divisor of its size such as 64")
    quantized = {name: NF4Linear(layer, cfg) for name, layer in
                 progress_bar(targets.items(), desc="NF4", unit="layer", disable=not progress)}
    replace_all(model, quantized)
    return model


def apply_qlora(model: nn.Module, lora_cfg: LoraConfig, nf4_cfg: NF4Config = NF4Config(),
                quantize_modules: tuple[str, ...] | None = None, progress: bool = False) -> nn.Module:
    """QLoRA: NF4-quantize ``quantize_modules``, freeze everything, then add LoRA to ``lora_cfg.target_modules``.

    QLoRA puts adapters on every linear of the blocks (pass ``target_modules="all-linear"`` in ``lora_cfg``);
    embeddings and norms stay in floating point and frozen. ``quantize_modules=None`` quantizes every linear of
    the model's blocks. The LoRA targets and ranks are checked before the first layer is quantized, so a failure
    leaves the model as it was. Returns ``model`` (modified in place).
    """
    lora_cfg = config_or_default(lora_cfg, LoraConfig, "LoraConfig(r=8, alpha=16)")
    for name, layer in find_linears(model, lora_targets(model, lora_cfg), skip=(LoraLinear,)).items():
        if lora_cfg.r > min(layer.in_features, layer.out_features):
            raise ValueError(f"r={lora_cfg.r} exceeds min(in_features, out_features) = "
                             f"{min(layer.in_features, layer.out_features)} of layer {name}; pick r <= that")
    quantize_model_nf4(model, nf4_cfg, quantize_modules, progress)
    return apply_lora(model, lora_cfg)
