"""SmoothQuant: migrate activation outliers into the weights with a per-channel scale, then quantize W8A8.

Paper: Xiao, Lin, Seznec, Wu, Demouth, Han (2023), "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", arXiv:2211.10438 — §4, Eq. 3–4.
Implements: a few input channels of LLM activations are 10–100× larger than the rest, and they are the
same channels for every token, so a per-tensor or per-token activation scale wastes almost all int8 levels
on them. Weights have no such outliers. For a linear Y = X W with X (T × C), SmoothQuant divides input
channel j of X by s_j and multiplies row j of W (column j of the nn.Linear weight) by s_j,

    Y = (X diag(s)⁻¹) (diag(s) W),        s_j = max|X_j|^α / max|W_j|^(1−α)          (Eq. 3, 4)

which changes nothing before rounding. The migration strength α (0.5 by default) splits the difficulty
between the two factors. diag(s)⁻¹ costs nothing at run time: it is folded into the operation that
*produced* X. We smooth four places of each LLaMA block:
  qkv      RMSNorm → q, k, v       the norm's gain g becomes g / s            (paper)
  gate_up  RMSNorm → gate, up      likewise                                   (paper)
  o        v → o                   v's output rows divided by s; with grouped-query attention one s per
                                   key/value channel serves all query heads that read it (extension)
  down     up → down               up's output rows divided by s; SwiGLU multiplies silu(gate) by up
                                   element-wise, so the scale passes through exactly (extension)
Outlier Suppression+ (outlier_suppression.py) reuses ``apply_channel_transform`` with a shift as well.
Glossary: X (T × C) a linear's input · W (C × out) its weight (nn.Linear stores Wᵀ) · s (C,) smoothing
          factors · α migration strength · group = the producer of X and the linears that read it.
Left out: the fused INT8 GEMM/LayerNorm kernels of the paper's FasterTransformer and PyTorch
integrations (kernels/w8a8.py is our int8 GEMM), static activation scales (O3); quantized BMMs in attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from effref.checks import calibration_or_none, config_or_default
from effref.compression.calibration import find_blocks
from effref.models.calls import forward_logits, model_device
from effref.quantization.driver import LayerInputs, collect_statistics
from effref.quantization.zeroquant import WAQuantConfig, wa_quantize_model
from effref.runtime import progress_bar

KINDS = ("qkv", "gate_up", "o", "down")
# Relative module names inside one decoder block: transformers' LlamaDecoderLayer, then ours.
LAYOUTS = (
    {"attn_norm": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
     "o": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm", "gate": "mlp.gate_proj",
     "up": "mlp.up_proj", "down": "mlp.down_proj"},
    {"attn_norm": "attn_norm", "q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
     "mlp_norm": "mlp_norm", "gate": "mlp.gate", "up": "mlp.up", "down": "mlp.down"},
)


@dataclass
class SmoothGroup:
    """A producer (norm or linear) and the linears that read its output: the unit a channel transform folds into."""

    name: str  # e.g. "blocks.3.qkv"
    block_name: str  # e.g. "blocks.3"
    block: nn.Module
    producer: str  # relative name inside the block
    consumers: list[str]
    kind: str
    kv_groups: int = 1  # "o": each of v's output channels feeds kv_groups query heads' inputs of o
    shift_ok: bool = True  # a shift passes through softmax-weighted sums, not through SwiGLU's product
    d_head: int = 0  # "o" only: head size, to map o's inputs to v's outputs

    def linears(self) -> list[nn.Linear]:
        return [self.block.get_submodule(n) for n in self.consumers]

    def reduce(self, stat: torch.Tensor, how: str = "max") -> torch.Tensor:
        """A consumer-input statistic (C_in,) → the group's channels (C,), combining the query heads of one kv head."""
        if self.kv_groups == 1:
            return stat
        view = stat.reshape(-1, self.kv_groups, self.d_head)  # (n_kv, groups, d_head): channel h·d_head + d
        return (view.amax(1) if how == "max" else view.amin(1)).reshape(-1)  # (n_kv · d_head,)

    def expand(self, v: torch.Tensor) -> torch.Tensor:
        """The group's channels (C,) → the consumers' input channels (C_in,): query head h reads kv head h // groups."""
        if self.kv_groups == 1:
            return v
        return v.reshape(-1, 1, self.d_head).expand(-1, self.kv_groups, -1).reshape(-1)  # (n_heads · d_head,)


def smoothing_groups(model: nn.Module, kinds: Sequence[str] = KINDS) -> list[SmoothGroup]:
    """The groups of every decoder block of a transformers LLaMA or an effref ``Llama``, in block order."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"kinds={sorted(unknown)} are not known; use a subset of {KINDS}")
    prefix, blocks = find_blocks(model)
    names = next((lay for lay in LAYOUTS if _has_all(blocks[0], lay.values())), None)
    if names is None:
        raise ValueError(f"{type(blocks[0]).__name__} is not a LLaMA block this module knows; supported: "
                         "transformers LlamaDecoderLayer and effref.models.llama.Block")
    groups = []
    for i, block in enumerate(blocks):
        q, v = block.get_submodule(names["q"]), block.get_submodule(names["v"])
        attn = block.get_submodule(names["q"].rpartition(".")[0])
        d_head = getattr(attn, "head_dim", None) or attn.d_head  # transformers, then ours
        spec = {"qkv": (names["attn_norm"], [names["q"], names["k"], names["v"]], 1, True),
                "gate_up": (names["mlp_norm"], [names["gate"], names["up"]], 1, True),
                "o": (names["v"], [names["o"]], q.out_features // v.out_features, True),
                "down": (names["up"], [names["down"]], 1, False)}
        for kind in kinds:
            producer, consumers, kv_groups, shift_ok = spec[kind]
            groups.append(SmoothGroup(f"{prefix}.{i}.{kind}", f"{prefix}.{i}", block, producer, consumers, kind,
                                      kv_groups, shift_ok, d_head))
    check_norm_producers(model, groups)
    return groups


@torch.no_grad()
def check_norm_producers(model: nn.Module, groups: list[SmoothGroup]) -> None:
    """Check on one forward pass, before anything changes, what folding a scale into a norm assumes: each norm
    producer's output is exactly what its consumers read, and the norm computes x / rms(x) · weight. A family
    that only borrows LLaMA's names (Gemma: the MLP reads another norm, and the gain is 1 + weight) is refused
    instead of silently changing the model's function."""
    norm_groups = [g for g in groups if not isinstance(g.block.get_submodule(g.producer), nn.Linear)]
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module name -> (its input, its output)
    handles = []
    for g in norm_groups:
        for name in [g.producer, *g.consumers]:
            def hook(module, inputs, output, key=f"{g.block_name}.{name}"):
                seen.setdefault(key, (inputs[0], output))
            handles.append(g.block.get_submodule(name).register_forward_hook(hook))
    config = getattr(model, "config", None) or model.cfg
    probe = (torch.arange(8, device=model_device(model)) * 7 % config.vocab_size)[None]  # (1, 8) token ids
    try:
        forward_logits(model, probe)
    finally:
        for h in handles:
            h.remove()
    for g in norm_groups:
        norm = g.block.get_submodule(g.producer)
        x, out = seen[f"{g.block_name}.{g.producer}"]
        for consumer in g.consumers:
            if not torch.equal(seen[f"{g.block_name}.{consumer}"][0], out):
                raise ValueError(f"{g.block_name}.{consumer} does not read the output of {g.producer} in "
                                 f"{type(model).__name__}: smoothing {g.kind} would change the model; this "
                                 "module supports LLaMA-shaped blocks only (pass kinds without it)")
        inner, bias = (norm.norm, norm.bias.float()) if isinstance(norm, ShiftedNorm) else (norm, 0.0)
        eps = getattr(inner, "variance_epsilon", getattr(inner, "eps", 1e-6))
        x32 = x.float()
        expected = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * inner.weight.float() + bias
        if not torch.allclose(out.float(), expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item()):
            raise ValueError(f"{g.block_name}.{g.producer} ({type(norm).__name__}) does not compute "
                             "x / rms(x) · weight (e.g. Gemma's RMSNorm scales by 1 + weight): dividing its "
                             "weight by s would not divide its output by s, so smoothing is refused here")


def _has_all(block: nn.Module, names) -> bool:
    try:
        return all(block.get_submodule(n) is not None for n in names)
    except AttributeError:
        return False


def collect_group_stats(model: nn.Module, groups: list[SmoothGroup], calib_batches: torch.Tensor,
                        needs: Sequence[str] = ("abs_max",), max_samples: int = 512, batch_size: int = 4,
                        seed: int = 0, progress: bool = True) -> dict[str, LayerInputs]:
    """Input statistics of each group (those of its first consumer) on the full-precision model, by group name."""
    if not isinstance(calib_batches, torch.Tensor) or calib_batches.ndim != 2 or calib_batches.is_floating_point():
        raise ValueError("calib_batches must be a (n, T) tensor of token ids; use effref.data.calibration_batches")
    wanted = {f"{g.block_name}.{g.consumers[0]}": g.name for g in groups}
    found = collect_statistics(model, calib_batches, needs, target=lambda name, module: name in wanted,
                               max_samples=max_samples, batch_size=batch_size, seed=seed, progress=progress)
    return {wanted[name]: stats for name, stats in found.items()}


class ShiftedNorm(nn.Module):
    """norm(x) + bias: lets a channel shift fold into a normalisation layer that has no bias of its own."""

    def __init__(self, norm: nn.Module, bias: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # the gain, so that scaling code treats both kinds of norm alike
        return self.norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) + self.bias.to(x.dtype)


def _set(block: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, module)


def _with_bias(linear: nn.Linear) -> nn.Linear:
    if linear.bias is not None:
        return linear
    new = nn.Linear(linear.in_features, linear.out_features, bias=True, device=linear.weight.device,
                    dtype=linear.weight.dtype)
    new.weight = linear.weight
    nn.init.zeros_(new.bias)
    return new


@torch.no_grad()
def apply_channel_transform(group: SmoothGroup, scale: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    """Replace the group's activations X by (X − z) / s and compensate in its consumers, exactly, in place.

    Producer: output divided by s and shifted by −z/s (a norm's gain g → g/s plus a bias; a linear's rows).
    Consumers: W x + b = (W diag(s)) x' + (W z + b), so columns scale by s and z moves into the bias.
    Arithmetic is done in float64 and rounded once to each parameter's dtype.
    """
    if shift is not None and not group.shift_ok:
        raise ValueError(f"group {group.name} ({group.kind}) cannot take a shift: the product in SwiGLU does not "
                         "pass it through; pass shift=None")
    s = scale.double()  # (C,)
    producer = group.block.get_submodule(group.producer)
    if isinstance(producer, nn.Linear):
        producer.weight.copy_(producer.weight.double() / s[:, None])  # output rows
        if shift is not None or producer.bias is not None:
            producer = _with_bias(producer)
            z = shift.double() if shift is not None else 0.0
            producer.bias.copy_((producer.bias.double() - z) / s)
            _set(group.block, group.producer, producer)
    else:  # a normalisation layer with a gain vector
        producer.weight.copy_(producer.weight.double() / s)
        if shift is not None:
            if not isinstance(producer, ShiftedNorm):
                producer = ShiftedNorm(producer, torch.zeros_like(producer.weight))
                _set(group.block, group.producer, producer)
            producer.bias.copy_((producer.bias.double() - shift.double()) / s)
    s_in = group.expand(s)  # (C_in,)
    for name, linear in zip(group.consumers, group.linears()):
        w = linear.weight.double()  # (out, C_in)
        if shift is not None:
            linear = _with_bias(linear)
            linear.bias.copy_(linear.bias.double() + w @ group.expand(shift.double()))  # W z + b
            _set(group.block, name, linear)
        linear.weight.copy_(w * s_in[None, :])


def smoothing_factors(act_abs_max: torch.Tensor, weight_abs_max: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Layer-level, Eq. 4: s_j = max|X_j|^α / max|W_j|^(1−α), both maxima clamped away from 0."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1] (0: no migration, 1: all difficulty to the weights); "
                         "the paper uses 0.5, up to 0.75–0.85 for models with larger outliers")
    a = act_abs_max.float().clamp(min=1e-5)  # (C,)
    w = weight_abs_max.float().clamp(min=1e-5)  # (C,)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)  # (C,)


def group_weight_abs_max(group: SmoothGroup) -> torch.Tensor:
    """max_j over every consumer's column j, reduced to the group's channels: (C,)."""
    cols = torch.stack([lin.weight.detach().abs().amax(0).float() for lin in group.linears()]).amax(0)
    return group.reduce(cols)


def smooth_model(model: nn.Module, calib_batches: torch.Tensor | None = None, alpha: float = 0.5,
                 kinds: Sequence[str] = KINDS, stats: dict[str, LayerInputs] | None = None,
                 progress: bool = True) -> dict[str, torch.Tensor]:
    """Model-level, before rounding: smooth every group in place; return the factors s per group name.

    Statistics come from ``stats`` (``collect_group_stats`` with "abs_max", possibly shared with OS+)
    or, when None, from one calibration pass over ``calib_batches``. The model's function is unchanged.
    """
    calib_batches = calibration_or_none(calib_batches, "smooth_model")
    groups = smoothing_groups(model, kinds)
    if stats is None:
        if calib_batches is None:
            raise ValueError("smooth_model needs activation statistics: pass calib_batches=calibration_batches(ids, "
                             "n, seq_len) or precomputed stats=collect_group_stats(...)")
        stats = collect_group_stats(model, groups, calib_batches, ("abs_max",), progress=progress)
    factors = {}
    for group in progress_bar(groups, desc=f"smoothing (α={alpha})", disable=not progress):
        if group.name not in stats or stats[group.name].abs_max is None:
            raise ValueError(f"stats has no abs_max for {group.name}; collect it with needs=('abs_max',)")
        act = group.reduce(stats[group.name].abs_max.to(group.linears()[0].weight.device))
        factors[group.name] = smoothing_factors(act, group_weight_abs_max(group), alpha)
        apply_channel_transform(group, factors[group.name])
    return factors


@dataclass
class SmoothQuantConfig:
    alpha: float = 0.5
    kinds: tuple[str, ...] = KINDS
    # the paper's W8A8 setting with the coarsest activation scale (per tensor), where outliers hurt most
    quant: WAQuantConfig = field(default_factory=lambda: WAQuantConfig(w_granularity="channel", a_granularity="tensor"))


def smoothquant_model(model: nn.Module, calib_batches: torch.Tensor | None = None,
                      cfg: SmoothQuantConfig | None = None, stats: dict[str, LayerInputs] | None = None,
                      progress: bool = True) -> nn.Module:
    """Smooth with ``cfg.alpha``, then quantize every block linear with ``cfg.quant`` (W8A8); in place."""
    calib_batches = calibration_or_none(calib_batches, "smoothquant_model")
    cfg = config_or_default(cfg, SmoothQuantConfig, "SmoothQuantConfig(alpha=0.5)")
    smooth_model(model, calib_batches, cfg.alpha, cfg.kinds, stats, progress)
    return wa_quantize_model(model, cfg.quant, progress=progress)
