"""Hyena: attention replaced by long implicit convolutions interleaved with element-wise gates.

Paper: Poli, Massaroli, Nguyen, Fu, Dao, Baccus, Bengio, Ermon, Ré (2023), "Hyena Hierarchy: Towards Larger
Convolutional Language Models", ICML 2023, arXiv:2302.10866 — §3 (the Hyena recurrence; implicit filters, an FFN of
positional features times a decaying window; long convolutions through the FFT).
Implements, for order N (the number of gates and of long filters):
  projections   (v, x¹, …, x^N) = split(ShortConv(W_in u)),  ShortConv a causal depthwise convolution of width 3
  recurrence    z¹ = v,  z^{n+1}_t = x^n_t ⊙ (h^n ∗ z^n + β^n ⊙ z^n)_t,  y = W_out z^{N+1}
  filters       h^n_t = FFN(PE(t))_n ⊙ window(t),  PE(t) = [t/L, cos(2πft/L), sin(2πft/L)] for f = 1 … F,
                FFN = Linear → sin → Linear → sin → Linear, window_c(t) = exp(−α_c t / L) with one decay rate α_c
                per channel, spread so that filters fall to 1% between 0.3 L and 1.5 L
  long convolutions through the FFT in O(L log L) (``recurrent.causal_conv_fft``) or term by term in O(L²).
The filters are *implicit*: their length is the sequence length, but their parameters are the FFN's, whatever L.
Glossary: d model width · L sequence length · N order · h^n (d, L) long filter n · β^n (d,) its skip term ·
          F positional frequencies · α_c decay rate of channel c.
Left out: the model around the operator (blocks, norms, MLPs), Hyena's recurrent inference by distillation into a
          state-space model, fused FFT-convolution kernels (FlashFFTConv), dropout.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from effref.alternatives.recurrent import causal_conv_direct, causal_conv_fft

CONVS = ("fft", "direct")


class Sin(nn.Module):
    """sin(ω ⊙ x) with a learned frequency per feature: the FFN's activation, which lets it draw oscillations."""

    def __init__(self, dim: int, w: float = 1.0):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class HyenaFilter(nn.Module):
    """The N implicit long filters of one operator, (N, d, L) for any L ≤ max_len."""

    def __init__(self, d_model: int, order: int, max_len: int, n_freqs: int = 8, width: int = 64):
        super().__init__()
        self.d_model, self.order, self.max_len = d_model, order, max_len
        t = torch.arange(max_len, dtype=torch.float32)[:, None] / max_len  # (max_len, 1)
        f = torch.arange(1, n_freqs + 1, dtype=torch.float32)[None, :]  # (1, F)
        pe = torch.cat([t, torch.cos(2 * math.pi * f * t), torch.sin(2 * math.pi * f * t)], dim=1)  # (max_len, 2F+1)
        self.register_buffer("pe", pe, persistent=False)
        self.ffn = nn.Sequential(nn.Linear(pe.shape[1], width), Sin(width), nn.Linear(width, width), Sin(width),
                                 nn.Linear(width, order * d_model))
        # α_c: e^{−α t/L} reaches 1% (log 100) at t between 0.3 L (fast channels) and 1.5 L (slow ones)
        alpha = torch.linspace(math.log(100) / 0.3, math.log(100) / 1.5, d_model)
        self.register_buffer("window", torch.exp(-alpha[None, :] * t), persistent=False)  # (max_len, d)
        self.beta = nn.Parameter(torch.randn(order, d_model))  # the skip term of every long convolution

    def forward(self, L: int) -> torch.Tensor:
        if not 1 <= L <= self.max_len:
            raise ValueError(f"L={L} must be in [1, max_len={self.max_len}]; build the operator with a larger "
                             "max_len")
        h = self.ffn(self.pe[:L]).view(L, self.order, self.d_model)  # (L, N, d)
        h = h * self.window[:L, None, :]  # (L, N, d): decaying with t, at a rate of its own per channel
        return h.permute(1, 2, 0)  # (N, d, L)


class HyenaOperator(nn.Module):
    """Hyena's drop-in replacement for attention: (B, L, d) → (B, L, d), causal, O(L log L) in the length."""

    def __init__(self, d_model: int, max_len: int, order: int = 2, short_width: int = 3, n_freqs: int = 8,
                 filter_width: int = 64, conv: str = "fft"):
        super().__init__()
        for name, value in (("d_model", d_model), ("max_len", max_len), ("order", order),
                            ("short_width", short_width), ("n_freqs", n_freqs), ("filter_width", filter_width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer (Hyena's language models use order=2)")
        if conv not in CONVS:
            raise ValueError(f"conv={conv!r} is not known; use one of {CONVS}")
        self.d_model, self.order, self.conv = d_model, order, conv
        self.in_proj = nn.Linear(d_model, (order + 1) * d_model)
        self.short = nn.Parameter(torch.randn((order + 1) * d_model, short_width) / short_width)  # depthwise
        self.filter = HyenaFilter(d_model, order, max_len, n_freqs, filter_width)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if u.ndim != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"u must have shape (B, L, d_model={self.d_model}), got {tuple(u.shape)}")
        L, k = u.shape[1], self.short.shape[1]
        z = self.in_proj(u).transpose(1, 2)  # (B, (N+1)·d, L)
        z = torch.nn.functional.pad(z, (k - 1, 0)).unfold(-1, k, 1)  # (B, (N+1)·d, L, k): causal windows
        z = (z * self.short[:, None, :]).sum(-1)  # (B, (N+1)·d, L): the short depthwise convolution
        v, *gates = z.split(self.d_model, dim=1)  # v and x¹ … x^N, each (B, d, L)
        h = self.filter(L)  # (N, d, L)
        convolve = causal_conv_fft if self.conv == "fft" else causal_conv_direct
        for n, x in enumerate(gates):
            v = x * (convolve(v, h[n]) + self.filter.beta[n, :, None] * v)  # z^{n+1} = x^n ⊙ (h^n ∗ z^n + β z^n)
        return self.out_proj(v.transpose(1, 2))  # (B, L, d)
