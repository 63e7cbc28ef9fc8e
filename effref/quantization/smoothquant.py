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
NORM_KINDS = ("qkv", "gate_up")  # the first and second normalisation in a block's forward pass that feed linears
# The two linear → linear groups follow the value path of attention and SwiGLU's product, which tensor matching
# cannot see, so they are found by name (transformers' LLaMA-shaped blocks, then ours) and verified after folding.
LINEAR_LAYOUTS = (
    {"q": "self_attn.q_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj", "up": "mlp.up_proj",
     "down": "mlp.down_proj"},
    {"q": "attn.q_proj", "v": "attn.v_proj", "o": "attn.o_proj", "up": "mlp.up", "down": "mlp.down"},
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
    gain_offset: float = 0.0  # norm producers: c in n(x)·(c + weight) + bias (0 for LLaMA and LayerNorm, 1 for Gemma)

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


def smoothing_groups(model: nn.Module, kinds: Sequence[str] | None = None,
                     probe: torch.Tensor | None = None) -> list[SmoothGroup]:
    """The groups of every decoder block, in block order; ``kinds=None`` takes every kind the model has.

    Norm groups are found from the model's own computation on ``probe`` token ids (a short fixed sequence by
    default): a linear belongs to the normalisation layer whose output tensor is exactly its input, and the
    norm's gain form is measured (see :func:`norm_gain_offset`). So LLaMA, Mistral, Qwen2, Gemma (gain
    1 + weight), Gemma 2 (extra norms), OPT and GPT-2 (LayerNorm with bias) all work without a name table.
    """
    unknown = set(kinds or ()) - set(KINDS)
    if unknown:
        raise ValueError(f"kinds={sorted(unknown)} are not known; use a subset of {KINDS}")
    prefix, blocks = find_blocks(model)
    norm_groups = find_norm_groups(model, blocks, probe)
    names = next((lay for lay in LINEAR_LAYOUTS if _has_all(blocks[0], lay.values())), None)
    available = [k for k in NORM_KINDS if all(k in found for found in norm_groups)]
    available += list(KINDS[2:]) if names is not None else []
    missing = [k for k in kinds or () if k not in available]
    if missing:
        why = (["qkv / gate_up need a normalisation layer that feeds linears directly"] * bool(set(missing) & set(NORM_KINDS))
               + ["o / down follow LLaMA-shaped v_proj → o_proj and up_proj → down_proj"] * bool(set(missing) - set(NORM_KINDS)))
        raise ValueError(f"{type(model).__name__} has no {missing} groups in every {type(blocks[0]).__name__}: "
                         f"{'; '.join(why)}; pass kinds from {available}")
    if not available:
        raise ValueError(f"{type(blocks[0]).__name__} has no group to smooth: no normalisation layer feeds its "
                         "linears directly (a post-norm block?) and it is not LLaMA-shaped")
    groups = []
    for i, block in enumerate(blocks):
        spec = dict(norm_groups[i])
        if names is not None:
            q, v = block.get_submodule(names["q"]), block.get_submodule(names["v"])
            attn = block.get_submodule(names["q"].rpartition(".")[0])
            d_head = getattr(attn, "head_dim", None) or attn.d_head  # transformers, then ours
            spec["o"] = (names["v"], [names["o"]], 0.0, q.out_features // v.out_features, True, d_head)
            spec["down"] = (names["up"], [names["down"]], 0.0, 1, False, 0)
        for kind in kinds or available:
            producer, consumers, offset, kv_groups, shift_ok, d_head = spec[kind]
            groups.append(SmoothGroup(f"{prefix}.{i}.{kind}", f"{prefix}.{i}", block, producer, consumers, kind,
                                      kv_groups, shift_ok, d_head, offset))
    return groups


def default_probe(model: nn.Module) -> torch.Tensor:
    config = getattr(model, "config", None) or getattr(model, "cfg", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no config with a vocab_size; pass probe= token ids")
    return (torch.arange(8, device=model_device(model)) * 7 % config.vocab_size)[None]  # (1, 8) token ids


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.ndim == 1
            and not isinstance(module, (nn.Linear, nn.Embedding)))


@torch.no_grad()
def find_norm_groups(model: nn.Module, blocks: nn.ModuleList,
                     probe: torch.Tensor | None = None) -> list[dict[str, tuple]]:
    """Per block, {"qkv" / "gate_up": (norm name, consumer names, gain offset, 1, True, 0)} from one forward.

    Every module with a 1-D ``weight`` (not a linear or embedding) is a candidate norm; each linear is matched to
    the candidate whose output *is* (or equals) its input. The first matched norm in call order is "qkv", the
    second "gate_up"; a norm nested in another candidate (ShiftedNorm's inner norm) is not a producer.
    """
    seen: dict[tuple[int, str], tuple] = {}  # (block, name) -> (call order, input, output)
    handles = []
    for i, block in enumerate(blocks):
        candidates = [n for n, m in block.named_modules() if _is_norm(m)]
        for name, module in block.named_modules():
            nested = any(name.startswith(c + ".") for c in candidates)
            if isinstance(module, nn.Linear) or (name in candidates and not nested):
                def hook(module, inputs, output, key=(i, name)):
                    if key not in seen and inputs:
                        seen[key] = (len(seen), inputs[0], output)
                handles.append(module.register_forward_hook(hook))
    try:
        forward_logits(model, default_probe(model) if probe is None else probe)
    finally:
        for h in handles:
            h.remove()
    found = []
    for i, block in enumerate(blocks):
        norms = sorted((order, name, x, out) for (b, name), (order, x, out) in seen.items()
                       if b == i and not isinstance(block.get_submodule(name), nn.Linear))
        readers: dict[str, list[str]] = {}
        for (b, name), (_, x, _) in seen.items():
            if b != i or not isinstance(block.get_submodule(name), nn.Linear):
                continue
            producer = next((n for _, n, _, out in norms if x is out), None) or next(
                (n for _, n, _, out in norms if out.shape == x.shape and torch.equal(out, x)), None)
            if producer is not None:
                readers.setdefault(producer, []).append(name)
        feeding = [(name, x, out) for _, name, x, out in norms if name in readers]
        if len(feeding) > len(NORM_KINDS):
            raise ValueError(f"block {i} has {len(feeding)} normalisation layers that feed linears "
                             f"({[n for n, _, _ in feeding]}); this module knows two (attention and MLP inputs)")
        found.append({kind: (name, readers[name], norm_gain_offset(block.get_submodule(name), x, out, name), 1,
                             True, 0) for kind, (name, x, out) in zip(NORM_KINDS, feeding)})
    return found


@torch.no_grad()
def norm_gain_offset(norm: nn.Module, x: torch.Tensor, out: torch.Tensor, name: str = "norm") -> float:
    """c in  norm(x) = n(x) · (c + weight) + bias, measured: c = 0 for LLaMA / LayerNorm, 1 for Gemma.

    The norm runs with its weight set to 0 and to 1 (then restored): the difference is n(x), the value at 0 is
    c·n(x) + bias. A norm whose output is not of this form cannot take a folded scale and is refused.
    """
    weight, saved = norm.weight, norm.weight.detach().clone()
    try:
        weight.zero_()
        at_zero = norm(x).float()
        weight.fill_(1.0)
        normalised = norm(x).float() - at_zero  # n(x)
    finally:
        weight.copy_(saved)
    bias = norm.bias.float() if getattr(norm, "bias", None) is not None else torch.zeros_like(saved).float()
    scale = max(out.float().abs().max().item(), 1e-6)
    rtol = 1e-3 if saved.dtype in (torch.float32, torch.float64) else 2e-2  # half types round every output
    for c in (0.0, 1.0):
        expected = normalised * (c + saved.float()) + bias
        if (torch.allclose(at_zero, normalised * c + bias, rtol=rtol, atol=rtol * 0.1 * scale)
                and torch.allclose(out.float(), expected, rtol=rtol, atol=rtol * scale)):
            return c
    raise ValueError(f"{name} ({type(norm).__name__}) does not compute n(x) · weight (+ bias) or n(x) · (1 + weight) "
                     "(+ bias) with a per-channel weight: a scale cannot be folded into it, so smoothing is refused")


def _has_all(block: nn.Module, names) -> bool:
    try:
        return all(block.get_submodule(n) is not None for n in names)
    except AttributeError:
        return False


@torch.no_grad()
def keep_function(model: nn.Module, groups: list[SmoothGroup], probe: torch.Tensor, transform):
    """Run ``transform()`` (which rewrites the groups in place) and check on ``probe`` token ids that the logits
    are unchanged; on any error or change, put every producer and consumer back and raise."""
    saved = []  # (block, name, module, its tensors): restored in reverse, so the first snapshot wins
    for g in groups:
        for name in [g.producer, *g.consumers]:
            module = g.block.get_submodule(name)
            saved.append((g.block, name, module, {k: v.clone() for k, v in module.state_dict().items()}))
    before = forward_logits(model, probe).float()
    try:
        result = transform()
        change = ((forward_logits(model, probe).float() - before).norm() / before.norm().clamp(min=1e-12)).item()
        tolerance = 1e-3 if next(model.parameters()).dtype in (torch.float32, torch.float64) else 5e-2
        if not change <= tolerance:
            raise ValueError(f"smoothing changed {type(model).__name__}'s logits by {change:.2%} on the calibration "
                             f"probe (allowed {tolerance:.2%}): its blocks do not compute what the folded scales "
                             "assume, so the model was left unchanged; pass fewer kinds (e.g. ('qkv', 'gate_up'))")
    except BaseException:
        for block, name, module, state in reversed(saved):
            module.load_state_dict(state)
            block.set_submodule(name, module)
        raise
    return result


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

    Producer: output divided by s and shifted by −z/s (a norm's gain c + w → (c + w)/s and its bias b →
    (b − z)/s, a bias added where it has none; a linear's rows and bias likewise).
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
            group.block.set_submodule(group.producer, producer)
    else:  # a normalisation layer n(x)·(c + w) + b
        c = group.gain_offset
        producer.weight.copy_((producer.weight.double() + c) / s - c)
        if shift is not None and getattr(producer, "bias", None) is None:
            producer = ShiftedNorm(producer, torch.zeros_like(producer.weight))
            group.block.set_submodule(group.producer, producer)
        if getattr(producer, "bias", None) is not None:
            z = shift.double() if shift is not None else 0.0
            producer.bias.copy_((producer.bias.double() - z) / s)
    s_in = group.expand(s)  # (C_in,)
    for name, linear in zip(group.consumers, group.linears()):
        w = linear.weight.double()  # (out, C_in)
        if shift is not None:
            linear = _with_bias(linear)
            linear.bias.copy_(linear.bias.double() + w @ group.expand(shift.double()))  # W z + b
            group.block.set_submodule(name, linear)
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
                 kinds: Sequence[str] | None = None, stats: dict[str, LayerInputs] | None = None,
                 progress: bool = True) -> dict[str, torch.Tensor]:
    """Model-level, before rounding: smooth every group in place; return the factors s per group name.

    ``kinds=None`` smooths every kind the model has (all four on LLaMA-shaped models, the two norm groups on
    OPT and GPT-2). Statistics come from ``stats`` (``collect_group_stats`` with "abs_max", possibly shared with
    OS+) or, when None, from one calibration pass over ``calib_batches``. The logits are checked unchanged on a
    calibration row afterwards; if they are not, the model is restored and the call refused.
    """
    calib_batches = calibration_or_none(calib_batches, "smooth_model")
    probe = None if calib_batches is None else calib_batches[:1, :64]  # (1, ≤ 64) token ids
    groups = smoothing_groups(model, kinds, probe)
    if stats is None:
        if calib_batches is None:
            raise ValueError("smooth_model needs activation statistics: pass calib_batches=calibration_batches(ids, "
                             "n, seq_len) or precomputed stats=collect_group_stats(...)")
        stats = collect_group_stats(model, groups, calib_batches, ("abs_max",), progress=progress)
    for group in groups:
        if group.name not in stats or stats[group.name].abs_max is None:
            raise ValueError(f"stats has no abs_max for {group.name}; collect it with needs=('abs_max',)")
    factors = {group.name: smoothing_factors(group.reduce(stats[group.name].abs_max.to(group.linears()[0].weight.device)),
                                             group_weight_abs_max(group), alpha) for group in groups}

    def transform() -> None:
        for group in progress_bar(groups, desc=f"smoothing (α={alpha})", disable=not progress):
            apply_channel_transform(group, factors[group.name])

    keep_function(model, groups, default_probe(model) if probe is None else probe, transform)
    return factors


@dataclass
class SmoothQuantConfig:
    alpha: float = 0.5
    kinds: tuple[str, ...] | None = None  # None: every kind the model has
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
