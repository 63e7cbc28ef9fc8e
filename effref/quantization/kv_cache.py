"""KV-cache quantization: store keys and values as 8- or 4-bit codes, one scale and zero point per token.

Papers: the KV-cache quantization of LLM-QAT (Liu et al., 2023, arXiv:2305.17888, §2.2: per-token, min-max)
and FlexGen (Sheng et al., 2023, arXiv:2303.06865, §5: group-wise 4-bit keys and values), survey §2.1.1.
Implements: during generation the cache holds 2 · L · n_kv · d_head numbers per token and grows with the
context; at long contexts or large batches it, not the weights, fills the memory. Each new key (and value)
vector is quantized the moment it is written, with the zero-point quantizer of ``basics``:

    per head:   one (s, z) per token per key/value head, over its d_head channels
    per token:  one (s, z) per token, over all n_kv · d_head channels of that token

    code = clamp(round(x / s) + z, 0, 2^b − 1),   x̂ = s · (code − z),   |x − x̂| ≤ s / 2 (+ fp16 rounding of s)

Codes are bit-packed (two 4-bit codes per byte), scales are fp16, zero points one byte; attention reads the
dequantized prefix. A token's statistics depend only on that token, so writing one token at a time during
decoding gives the same codes as writing the whole prompt at once.
Memory per token and layer: 2 · n_kv · d_head · b / 8 bytes of codes plus 2 · (2 + 1) bytes per scale group.
Glossary: b bits · s scale · z zero point · B batch · n_kv key/value heads · d_head head size · S cached tokens.
Left out: per-channel key quantization (KIVI), outlier-aware or non-uniform grids (KVQuant), fused
dequantize-in-attention kernels (this cache dequantizes the whole prefix on every read, a simulation of
the accuracy and an exact count of the bytes, not of the speed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from effref.models.llama import KVCache, Llama
from effref.quantization.basics import QTensor, QuantConfig, pack, quantize, unpack

GRANULARITIES = ("head", "token")


@dataclass
class KVQuantConfig:
    bits: int = 8
    granularity: str = "head"  # "head": per token and key/value head · "token": per token, all heads together
    symmetric: bool = False

    def __post_init__(self) -> None:
        QuantConfig(bits=self.bits)  # validates bits (2 … 8)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r} is not known; use one of {GRANULARITIES}")

    def quant_config(self) -> QuantConfig:
        return QuantConfig(bits=self.bits, granularity="channel", symmetric=self.symmetric,
                           scale_dtype=torch.float16)  # "channel" = one (s, z) per row; rows are set below

    def describe(self) -> str:
        return f"int{self.bits} KV, per {self.granularity}, {'sym' if self.symmetric else 'asym'}"


def kv_rows(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """(B, n_kv, T, d_head) → rows that share one (s, z): (B, n_kv, T, d_head) or (B, T, n_kv · d_head)."""
    if granularity == "head":
        return x
    B, n_kv, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, n_kv * d)


def quantize_kv(x: torch.Tensor, cfg: KVQuantConfig) -> QTensor:
    """Layer-level: quantize new keys or values x (B, n_kv, T, d_head); codes keep the row layout of ``kv_rows``."""
    if x.ndim != 4:
        raise ValueError(f"x must be (B, n_kv_heads, T, d_head), got shape {tuple(x.shape)}")
    return quantize(kv_rows(x, cfg.granularity), cfg.quant_config())


class QuantizedKVCache(KVCache):
    """A ``KVCache`` that stores packed b-bit codes, fp16 scales and uint8 zero points instead of floats.

    Same protocol as the float cache (``update`` returns what attention reads, in the model's dtype); the
    float buffers are never allocated. ``nbytes`` counts every stored byte.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, d_head: int, max_len: int,
                 cfg: KVQuantConfig, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if not isinstance(cfg, KVQuantConfig):
            raise TypeError(f"cfg must be a KVQuantConfig, got {type(cfg).__name__}")
        if (d_head * cfg.bits) % 8:
            raise ValueError(f"d_head={d_head} · bits={cfg.bits} is not a whole number of bytes; each row of "
                             "codes must fill whole bytes (use 8 or 4 bits, or a d_head divisible by 8)")
        self.cfg, self.dtype, self.n_kv_heads, self.d_head = cfg, dtype, n_kv_heads, d_head
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0
        code_shape = (batch_size, n_kv_heads, max_len, d_head * cfg.bits // 8)  # packed bytes per row
        stat_shape = (batch_size, n_kv_heads, max_len) if cfg.granularity == "head" else (batch_size, max_len)

        def alloc(shape, dt):
            return [[torch.zeros(shape, dtype=dt, device=device) for _ in range(n_layers)] for _ in range(2)]

        self.k, self.v = alloc(code_shape, torch.uint8)  # codes
        self.k_scale, self.v_scale = alloc(stat_shape, torch.float16)
        self.k_zero, self.v_zero = alloc(stat_shape, torch.uint8) if not cfg.symmetric else ([], [])

    @property
    def nbytes(self) -> int:
        """Bytes of everything stored: codes, scales and zero points, for all layers, keys and values."""
        parts = self.k + self.v + self.k_scale + self.v_scale + self.k_zero + self.v_zero
        return sum(t.numel() * t.element_size() for t in parts)

    def _write(self, layer: int, x: torch.Tensor, codes: list, scales: list, zeros: list, start: int) -> None:
        B, n_kv, T, d = x.shape
        q = quantize_kv(x, self.cfg)
        offset = 0 if q.zero is not None else 2 ** (self.cfg.bits - 1)  # signed codes are stored shifted
        c = q.codes.to(torch.int32) + offset  # rows of kv_rows(x)
        if self.cfg.granularity == "token":
            c = c.reshape(B, T, n_kv, d).transpose(1, 2)  # (B, n_kv, T, d_head)
        packed = pack(c.contiguous(), self.cfg.bits).view(B, n_kv, T, -1)  # (B, n_kv, T, d·b/8)
        codes[layer][:, :, start:start + T] = packed
        stat_shape = (B, n_kv, T) if self.cfg.granularity == "head" else (B, T)
        scales[layer][..., start:start + T] = q.scale.view(stat_shape)
        if q.zero is not None:
            zeros[layer][..., start:start + T] = q.zero.view(stat_shape)

    def _read(self, layer: int, codes: list, scales: list, zeros: list, end: int) -> torch.Tensor:
        B, n_kv, d = self.batch_size, self.n_kv_heads, self.d_head
        packed = codes[layer][:, :, :end].reshape(-1)
        c = unpack(packed, self.cfg.bits, B * n_kv * end * d).view(B, n_kv, end, d).to(torch.int16)
        if self.cfg.symmetric:
            c = c - 2 ** (self.cfg.bits - 1)
        if self.cfg.granularity == "token":
            c = c.transpose(1, 2).reshape(B * end, n_kv * d)  # rows of the per-token quantizer
        else:
            c = c.reshape(B * n_kv * end, d)
        scale = scales[layer][..., :end].reshape(-1, 1)  # (rows, 1)
        zero = zeros[layer][..., :end].reshape(-1, 1) if zeros else None
        x = QTensor(c, scale, zero, self.cfg.bits, "channel", c.shape[1], self.cfg.symmetric,
                    tuple(c.shape)).dequantize()  # (rows, C) float32
        if self.cfg.granularity == "token":
            return x.view(B, end, n_kv, d).transpose(1, 2).to(self.dtype)  # (B, n_kv, S, d_head)
        return x.view(B, n_kv, end, d).to(self.dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {start} cached + {k.shape[2]} new tokens > max_len="
                             f"{self.max_len}; create the cache with a larger max_len")
        self._write(layer, k, self.k, self.k_scale, self.k_zero, start)
        self._write(layer, v, self.v, self.v_scale, self.v_zero, start)
        return (self._read(layer, self.k, self.k_scale, self.k_zero, end),
                self._read(layer, self.v, self.v_scale, self.v_zero, end))  # (B, n_kv, S, d_head) each


def quantized_cache(model: Llama, batch_size: int, max_len: int | None, cfg: KVQuantConfig) -> QuantizedKVCache:
    """Model-level: an empty quantized cache shaped for ``model`` (like ``model.new_cache``)."""
    if not isinstance(model, Llama):
        raise TypeError(f"model must be an effref.models.llama.Llama (load_model(..., impl='effref')), got "
                        f"{type(model).__name__}; convert a LLaMA, Mistral, Qwen2 or Gemma model with "
                        "Llama.from_hf(model)")
    max_len = model.cfg.max_seq_len if max_len is None else max_len
    if batch_size < 1 or not 1 <= max_len <= model.cfg.max_seq_len:
        raise ValueError(f"batch_size={batch_size}, max_len={max_len}: need batch_size >= 1 and "
                         f"1 <= max_len <= max_seq_len={model.cfg.max_seq_len}")
    w = model.embed.weight
    return QuantizedKVCache(model.cfg.n_layers, batch_size, model.cfg.n_kv_heads, model.cfg.d_head, max_len, cfg,
                            dtype=w.dtype, device=w.device)


class WithQuantizedKV(nn.Module):
    """``model`` whose every forward writes its keys and values through a fresh quantized cache (for perplexity)."""

    def __init__(self, model: Llama, cfg: KVQuantConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        return self.model(input_ids, quantized_cache(self.model, B, T, self.cfg))  # (B, T, vocab)


def cache_nbytes(cache: KVCache) -> int:
    """Stored bytes of a float or quantized cache (all layers, keys and values, metadata included)."""
    if isinstance(cache, QuantizedKVCache):
        return cache.nbytes
    return sum(t.numel() * t.element_size() for t in cache.k + cache.v)
