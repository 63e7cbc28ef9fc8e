"""Quantization basics: absmax and zero-point round-to-nearest, granularity, bit packing.

Paper: the survey's Eq. 1 (Wan et al., 2024, §2.1.1), after Dettmers et al. (2022), arXiv:2208.07339;
zero-point (asymmetric) quantization as in Jacob et al. (2018), arXiv:1712.05877, and GPTQ's reference code.
Implements, for a weight W (rows = output channels, last dim = input dim) and b bits:
  absmax (symmetric):   s = absmax(W_g) / (2^(b-1) - 1),  q = clamp(round(W_g / s), -(2^(b-1)-1), 2^(b-1)-1),
                        Ŵ_g = s · q                                   (Eq. 1 with K = 1/s)
  zero-point (asym.):   s = (max(W_g, 0) - min(W_g, 0)) / (2^b - 1),  z = round(-min(W_g, 0) / s),
                        q = clamp(round(W_g / s) + z, 0, 2^b - 1),    Ŵ_g = s · (q - z)
where the group W_g is the whole tensor, one row (channel), or `group_size` consecutive inputs of one row.
The range always contains 0, so an exact zero stays exact and the integer zero point fits in b bits.
Glossary: s scale · z zero point · q integer code · b bits · g group size · R rows · C input dim · G = C / g.
Left out: non-uniform grids (NF4, k-means), stochastic rounding, clipping search (AWQ's lives in awq.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GRANULARITIES = ("tensor", "channel", "group")


def suggest_divisor(n: int, near: int) -> int:
    """The divisor of ``n`` closest to ``near`` (ties: the smaller one), for error messages."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - near), d))


@dataclass
class QuantConfig:
    """How to quantize: bit width, granularity (tensor / channel / group), group size, symmetric or not."""

    bits: int = 4
    granularity: str = "group"
    group_size: int = 128
    symmetric: bool = False
    scale_dtype: torch.dtype = field(default=torch.float16)  # how scales are stored (and counted in nbytes)
    fit_group_size: bool = False  # True: when group_size does not divide the input dim, use its nearest divisor

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits!r} is not supported; use an integer from 2 to 8")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r} is not known; use one of {GRANULARITIES}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size={self.group_size!r} must be a positive integer (e.g. 128)")
        if not self.scale_dtype.is_floating_point:
            raise ValueError(f"scale_dtype={self.scale_dtype} must be a floating dtype (e.g. torch.float16)")

    def group_size_for(self, in_features: int) -> int:
        """The group size used for ``in_features`` inputs (``group_size``, or its nearest divisor if fitting)."""
        if self.granularity == "group" and in_features % self.group_size and self.fit_group_size:
            return suggest_divisor(in_features, self.group_size)
        return self.group_size

    def check_input_dim(self, in_features: int) -> None:
        """Raise if ``group_size`` does not divide the input dimension (only for granularity 'group')."""
        if self.granularity == "group" and in_features % self.group_size_for(in_features):
            raise ValueError(f"group_size={self.group_size} does not divide in_features={in_features}; use a "
                             f"divisor such as {suggest_divisor(in_features, self.group_size)} "
                             "(or fit_group_size=True to pick the nearest divisor per layer)")

    def groups(self, rows: int, cols: int) -> tuple[int, int]:
        """Shape (rows, groups per row) of the scale for a (rows, cols) weight."""
        self.check_input_dim(cols)
        return {"tensor": (1, 1), "channel": (rows, 1), "group": (rows, cols // self.group_size_for(cols))}[self.granularity]


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest integer code: [-(2^(b-1)-1), 2^(b-1)-1] symmetric, [0, 2^b-1] asymmetric."""
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def find_params(w: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype = torch.float16,
                dim: int = -1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and integer zero point, None if symmetric) of the values of ``w`` reduced over ``dim``.

    Shapes keep ``dim`` with size 1, so they broadcast against ``w``. The scale is rounded to ``scale_dtype``
    before use, so codes are computed with exactly the scale that will be stored.
    """
    _lo_code, hi_code = code_range(bits, symmetric)
    w = w.float()
    if symmetric:
        scale = w.abs().amax(dim, keepdim=True) / hi_code  # Eq. 1: s = absmax / (2^(b-1) - 1)
    else:
        lo = w.amin(dim, keepdim=True).clamp(max=0)  # the range contains 0
        hi = w.amax(dim, keepdim=True).clamp(min=0)
        scale = (hi - lo) / hi_code
    tiny = torch.finfo(scale_dtype).tiny  # an all-zero group gets a tiny scale; its codes are all z
    scale = scale.to(scale_dtype).clamp(min=tiny).float()
    if symmetric:
        return scale, None
    zero = torch.round(-lo / scale).clamp(0, hi_code)  # integer zero point in [0, 2^b - 1]
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` on the grid ``scale·(q - zero)`` (int16, same shape as ``w``)."""
    lo_code, hi_code = code_range(bits, zero is None)
    q = torch.round(w.float() / scale if zero is None else w.float() / scale + zero)  # zero may be real-valued
    return q.clamp(lo_code, hi_code).to(torch.int16)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """float32 values ``scale · (codes - zero)`` (zero = 0 when symmetric); shapes broadcast."""
    q = codes.float()
    return (q if zero is None else q - zero.float()) * scale.float()


@dataclass
class QTensor:
    """A quantized tensor: unpacked integer codes plus the statistics that map them back to floats.

    ``codes`` has the shape of the original tensor; ``scale`` and ``zero`` are (R, G) with R the rows
    (or 1 for per-tensor) and G the groups per row. ``zero`` is None for symmetric quantization; it may be a
    float tensor, or itself a QTensor (SpQR quantizes its statistics), and so may ``scale``; such a nested
    QTensor may hold the statistics transposed, (G, R), when ``transposed_stats`` is set.
    """

    codes: torch.Tensor
    scale: torch.Tensor | QTensor
    zero: torch.Tensor | QTensor | None
    bits: int
    granularity: str
    group_size: int
    symmetric: bool
    shape: tuple[int, ...]
    transposed_stats: bool = False

    def _value(self, stat: torch.Tensor | QTensor | None) -> torch.Tensor | None:
        if not isinstance(stat, QTensor):
            return stat
        value = stat.dequantize()
        return value.T if self.transposed_stats else value

    def dequantize(self) -> torch.Tensor:
        """float32 tensor of ``shape``."""
        scale = self._value(self.scale).float()  # (R or 1, G)
        zero = self._value(self.zero)
        rows = scale.shape[0]
        codes = self.codes.reshape(rows, scale.shape[1], -1)  # (R or 1, G, C / G)
        zero = None if zero is None else zero.float()[..., None]  # (R or 1, G, 1)
        return dequantize_codes(codes, scale[..., None], zero).reshape(self.shape)

    @staticmethod
    def _stat_bytes(stat: torch.Tensor | QTensor | None, bits: int) -> int:
        if stat is None:
            return 0
        if isinstance(stat, QTensor):
            return stat.nbytes
        if stat.is_floating_point():
            return stat.numel() * stat.element_size()
        return packed_nbytes(stat.numel(), bits)  # integer zero points are packed like the codes

    @property
    def nbytes(self) -> int:
        """Storage in bytes: codes packed at ``bits`` plus scales and zero points as stored."""
        return (packed_nbytes(self.codes.numel(), self.bits) + self._stat_bytes(self.scale, self.bits)
                + self._stat_bytes(self.zero, self.bits))

    @property
    def bits_per_value(self) -> float:
        return 8 * self.nbytes / self.codes.numel()


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.ndim < 1 or w.numel() == 0:
        raise ValueError(f"w must be a non-empty tensor with a last (input) dimension, got {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("w contains inf or NaN; quantization needs finite values")


def quantize(w: torch.Tensor, cfg: QuantConfig) -> QTensor:
    """Round-to-nearest quantization of ``w`` (..., C): rows are all leading dims flattened, C the input dim.

    Per-tensor: one (scale, zero) pair; per-channel: one per row; per-group: one per ``group_size``
    consecutive inputs of each row. Raises if ``group_size`` does not divide C.
    """
    _check_weight(w)
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"cfg must be a QuantConfig, got {type(cfg).__name__}")
    flat = w.detach().reshape(-1, w.shape[-1]).float()  # (R, C)
    rows, cols = flat.shape
    n_rows, n_groups = cfg.groups(rows, cols)
    grouped = flat.reshape(n_rows, n_groups, -1)  # (R or 1, G, C / G)
    scale, zero = find_params(grouped, cfg.bits, cfg.symmetric, cfg.scale_dtype)  # (R or 1, G, 1)
    codes = quantize_codes(grouped, scale, zero, cfg.bits).reshape(w.shape)
    zero = None if zero is None else zero[..., 0].to(torch.uint8)  # (R or 1, G)
    return QTensor(codes, scale[..., 0].to(cfg.scale_dtype), zero, cfg.bits, cfg.granularity,
                   cfg.group_size_for(cols), cfg.symmetric, tuple(w.shape))


def dequantize(q: QTensor) -> torch.Tensor:
    """The float32 tensor a QTensor stands for (same as ``q.dequantize()``)."""
    if not isinstance(q, QTensor):
        raise TypeError(f"q must be a QTensor, got {type(q).__name__}; make one with quantize(w, cfg)")
    return q.dequantize()


def fake_quantize(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Quantize then dequantize: the rounded values of ``w`` in ``w``'s own dtype (for simulation and QAT)."""
    return quantize(w, cfg).dequantize().to(w.dtype)


# ---------------------------------------------------------------------------------------------------------
# Packing: b-bit codes stored as a dense bit stream, 8 bits per byte (3-bit codes: 8 codes in 3 bytes).


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} must be an integer from 1 to 8")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes in [0, 2^bits) into a 1-D uint8 tensor of ceil(numel·bits/8) bytes.

    Layout: a little-endian bit stream, code after code; so every 8 codes fill exactly ``bits`` bytes, which
    is how both directions work: 8 codes -> one 8·bits-bit integer -> ``bits`` bytes.
    """
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for bits={bits}, got [{int(flat.min())}, "
                         f"{int(flat.max())}]; shift signed codes by 2^(bits-1) first")
    if bits == 8:
        return flat.to(torch.uint8)
    octets = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8)).reshape(-1, 8)  # (m, 8) codes
    word = torch.zeros(octets.shape[0], dtype=torch.int64, device=flat.device)  # (m,) 8·bits-bit integers
    for i in range(8):
        word |= octets[:, i] << (bits * i)
    out = torch.stack([(word >> (8 * j)) & 255 for j in range(bits)], dim=1)  # (m, bits) bytes
    return out.reshape(-1)[: packed_nbytes(flat.numel(), bits)].to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes, as a 1-D uint8 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.ndim != 1:
        raise TypeError(f"packed must be a 1-D uint8 tensor from pack(), got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"packed has {packed.numel()} bytes but {numel} codes of {bits} bits need "
                         f"{packed_nbytes(numel, bits)}; pass the numel used when packing")
    if bits == 8:
        return packed.clone()
    mask = 2**bits - 1
    if 8 % bits == 0:  # 1, 2 or 4 bits: whole codes inside each byte
        return torch.stack([(packed >> s) & mask for s in range(0, 8, bits)], dim=1).reshape(-1)[:numel]
    chunks = torch.nn.functional.pad(packed, (0, (-packed.numel()) % bits)).reshape(-1, bits).to(torch.int64)
    word = torch.zeros(chunks.shape[0], dtype=torch.int64, device=packed.device)  # (m,) 8 codes each
    for j in range(bits):
        word |= chunks[:, j] << (8 * j)
    codes = torch.stack([(word >> (bits * i)) & mask for i in range(8)], dim=1)  # (m, 8)
    return codes.reshape(-1)[:numel].to(torch.uint8)

