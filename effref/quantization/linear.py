"""QuantLinear: a linear layer whose weight is stored quantized, as buffers, and dequantized on the fly.

Every weight-only method in this package produces one. The stored parts, all optional except the core:
  core       packed integer codes + scales + zero points (a QTensor; its statistics may be quantized too)
  sparse     SpQR: a few exact fp16 entries (flat indices ``sparse_idx``, values ``sparse_val``)
  outliers   LLM.int8(): whole fp16 input columns (``outlier_cols``, ``outlier_weight`` of shape (R, k))
  scaling    AWQ: a per-input-channel scale s; the core holds Q(W·diag(s)), the layer uses Q(·)·diag(1/s)
  rotations  QuIP: orthogonal U (output side) and V (input side) as Kronecker factors with random signs;
             the core holds Q(U W Vᵀ), the layer uses Uᵀ Q(·) V
so that the weight the forward uses is  Ŵ = Uᵀ [(deq(core) ⊕ sparse ⊕ outliers) · diag(1/s)] V.
All parts are buffers, so ``effref.eval.model_size_bytes`` and safetensors see exactly what is stored.
Left out: fused dequantize-matmul kernels (kernels/ has Triton ones); the forward here is dequantize + F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effref.quantization.basics import QTensor, pack, unpack
from effref.quantization.rotations import hadamard_factors, unrotate_weight

_DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8,
                               torch.int8, torch.int16, torch.int32, torch.int64)}


def _flatten_qtensor(q: QTensor, prefix: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """JSON-able description + buffers of a QTensor (codes packed; integer zeros packed at q.bits)."""
    offset = 2 ** (q.bits - 1) if q.symmetric else 0  # symmetric codes are shifted to be ≥ 0
    meta = {"bits": q.bits, "granularity": q.granularity, "group_size": q.group_size,
            "symmetric": q.symmetric, "shape": list(q.shape), "offset": offset,
            "transposed_stats": q.transposed_stats}
    buffers = {f"{prefix}qweight": pack(q.codes.to(torch.int32) + offset, q.bits)}
    for part in ("scale", "zero"):
        stat = getattr(q, part)
        if stat is None:
            meta[part] = None
        elif isinstance(stat, QTensor):
            meta[part], sub = _flatten_qtensor(stat, f"{prefix}{part}_")
            buffers.update(sub)
        elif stat.is_floating_point():
            meta[part] = {"float": list(stat.shape)}
            buffers[f"{prefix}{part}"] = stat
        else:
            meta[part] = {"packed": list(stat.shape)}
            buffers[f"{prefix}{part}"] = pack(stat, q.bits)
    return meta, buffers


class QuantLinear(nn.Module):
    """y = x Ŵᵀ + b with Ŵ rebuilt from quantized buffers (see the module docstring for the parts)."""

    def __init__(self, in_features: int, out_features: int, meta: dict, buffers: dict[str, torch.Tensor]):
        super().__init__()
        self.in_features, self.out_features, self.meta = in_features, out_features, meta
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor)

    @classmethod
    def from_linear(cls, linear: nn.Linear, qtensor: QTensor, *, sparse_idx: torch.Tensor | None = None,
                    sparse_val: torch.Tensor | None = None, outlier_cols: torch.Tensor | None = None,
                    outlier_weight: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                    rot_in: tuple[list[torch.Tensor], torch.Tensor] | None = None,
                    rot_out: tuple[list[torch.Tensor], torch.Tensor] | None = None,
                    dtype: torch.dtype = torch.float16, **extra) -> QuantLinear:
        """Wrap a quantized weight (and its optional parts) in place of ``linear``; float parts in ``dtype``.

        ``rot_in`` / ``rot_out`` are (Kronecker factors, signs) of V = (F_0 ⊗ F_1 …)·diag(signs); factors are
        kept in float32 so that the rotation stays orthogonal to rounding error.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if tuple(qtensor.shape) != tuple(linear.weight.shape):
            raise ValueError(f"qtensor.shape={tuple(qtensor.shape)} differs from the linear weight "
                             f"{tuple(linear.weight.shape)}; quantize linear.weight itself")
        meta, buffers = _flatten_qtensor(qtensor, "")
        meta = {"core": meta, "class": f"{cls.__module__}.{cls.__qualname__}", "extra": extra}
        if linear.bias is not None:
            buffers["bias"] = linear.bias.detach().clone()
        if (sparse_idx is None) != (sparse_val is None) or (outlier_cols is None) != (outlier_weight is None):
            raise ValueError("pass sparse_idx with sparse_val, and outlier_cols with outlier_weight")
        if sparse_idx is not None:
            buffers["sparse_idx"], buffers["sparse_val"] = sparse_idx.to(torch.int32), sparse_val.to(dtype)
        if outlier_cols is not None:
            buffers["outlier_cols"], buffers["outlier_weight"] = outlier_cols.to(torch.int32), outlier_weight.to(dtype)
        if input_scale is not None:
            buffers["input_scale"] = input_scale.to(dtype)
        meta["hadamard"] = []
        for side, rot in (("rot_in", rot_in), ("rot_out", rot_out)):
            if rot is not None:
                factors, signs = rot
                if isinstance(factors, str):  # "hadamard": deterministic factors, rebuilt rather than stored
                    meta["hadamard"].append(side)
                else:
                    buffers.update({f"{side}_f{i}": f.float().contiguous() for i, f in enumerate(factors)})
                buffers[f"{side}_signs"] = signs.to(torch.int8)
        meta["buffers"] = {name: [str(t.dtype), list(t.shape)] for name, t in buffers.items()}
        module = cls(linear.in_features, linear.out_features, meta, buffers)
        return module.to(linear.weight.device)

    @classmethod
    def from_meta(cls, in_features: int, out_features: int, meta: dict) -> QuantLinear:
        """An empty module with the buffers (names, shapes, dtypes) ``meta`` describes, for loading."""
        buffers = {name: torch.zeros(shape, dtype=_DTYPES[dtype]) for name, (dtype, shape) in meta["buffers"].items()}
        return cls(in_features, out_features, meta, buffers)

    # The save/load protocol of effref.compression.io: a JSON spec rebuilds an empty module of the right layout.
    spec_sets_dtypes = True  # each buffer's dtype is part of the spec: loading must not cast it to the skeleton's

    def spec(self) -> dict:
        return {"in": self.in_features, "out": self.out_features, "meta": self.meta}

    @classmethod
    def from_spec(cls, spec: dict) -> QuantLinear:
        return cls.from_meta(spec["in"], spec["out"], spec["meta"])

    def _qtensor(self, meta: dict, prefix: str) -> QTensor:
        numel = 1
        for d in meta["shape"]:
            numel *= d
        codes = unpack(getattr(self, f"{prefix}qweight"), meta["bits"], numel).to(torch.int16) - meta["offset"]
        stats = {}
        for part in ("scale", "zero"):
            m = meta[part]
            if m is None:
                stats[part] = None
            elif "bits" in m:
                stats[part] = self._qtensor(m, f"{prefix}{part}_")
            elif "float" in m:
                stats[part] = getattr(self, f"{prefix}{part}")
            else:
                shape = m["packed"]
                stats[part] = unpack(getattr(self, f"{prefix}{part}"), meta["bits"], shape[0] * shape[1]).view(shape)
        return QTensor(codes.view(meta["shape"]), stats["scale"], stats["zero"], meta["bits"],
                       meta["granularity"], meta["group_size"], meta["symmetric"], tuple(meta["shape"]),
                       meta["transposed_stats"])

    def qtensor(self) -> QTensor:
        """The stored core as a QTensor (codes unpacked)."""
        return self._qtensor(self.meta["core"], "")

    def _rotation(self, side: str) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        if side in self.meta.get("hadamard", ()):
            signs = getattr(self, f"{side}_signs")
            return [f.to(signs.device) for f in hadamard_factors(signs.numel())], signs
        factors = [t for name, t in self.named_buffers() if name.startswith(f"{side}_f")]
        return (factors, getattr(self, f"{side}_signs")) if factors else None

    def dequantize_weight(self) -> torch.Tensor:
        """Ŵ (out_features, in_features) in float32, every stored part applied."""
        w = self.qtensor().dequantize()  # (R, C)
        if hasattr(self, "sparse_idx"):
            w.view(-1)[self.sparse_idx.long()] = self.sparse_val.float()
        if hasattr(self, "outlier_cols"):
            w[:, self.outlier_cols.long()] = self.outlier_weight.float()
        if hasattr(self, "input_scale"):
            w = w / self.input_scale.float()  # Q(W diag(s)) diag(1/s)
        return unrotate_weight(w, self._rotation("rot_in"), self._rotation("rot_out"))  # Uᵀ Ŵ' V

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = getattr(self, "bias", None)
        return F.linear(x, self.dequantize_weight().to(x.dtype), None if bias is None else bias.to(x.dtype))

    def extra_repr(self) -> str:
        core = self.meta["core"]
        kind = "sym" if core["symmetric"] else "asym"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={core['bits']}, "
                f"{core['granularity']}{'' if core['granularity'] != 'group' else core['group_size']}, {kind}")


def quantized_linear_bits(model: nn.Module) -> float:
    """Stored bits per weight over the QuantLinear modules of ``model`` (codes, statistics and extras)."""
    modules = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not modules:
        raise ValueError("model has no QuantLinear modules; quantize it first (e.g. with quantize_model)")
    stored = sum(t.numel() * t.element_size() for m in modules for name, t in m.named_buffers() if name != "bias")
    return 8 * stored / sum(m.in_features * m.out_features for m in modules)
