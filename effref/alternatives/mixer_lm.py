"""Hyena and RetNet as language models: one pre-norm frame, with the token mixer as the only difference.

Papers: Poli et al. (2023), "Hyena Hierarchy: Towards Larger Convolutional Language Models", arXiv:2302.10866
(§3, the Hyena operator replaces attention in a GPT-style block); Sun et al. (2023), "Retentive Network: A
Successor to Transformer for Large Language Models", arXiv:2307.08621 (§2.3, the RetNet block: multi-scale
retention in place of attention, then an FFN, both pre-LayerNorm with residuals).
Implements, for layers l = 1 … L,

    Y_l = X_l + Mixer_l(LN(X_l)),     X_{l+1} = Y_l + FFN_l(LN(Y_l)),     FFN(x) = W₂ gelu(W₁ x),

with Mixer = ``HyenaOperator`` (order 2: long implicit convolutions and gates) or ``MultiScaleRetention`` in its
parallel form, over a token embedding, a final LayerNorm and a head tied to the embedding.
Glossary: X (B, T, d_model) hidden states · L ``n_layers`` · FFN width ``d_ff`` · T ≤ ``max_len``.
Left out: generation. Hyena has no state of fixed size (each new token convolves the whole prefix), and a RetNet
here is trained and scored only (``effref.longcontext.retnet`` has retention's recurrent form for decoding, but
this frame does not carry its state); Hyena's and RetNet's own initialisations and the RetNet paper's doubled
value width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from effref.alternatives.hyena import HyenaOperator
from effref.checks import token_ids_or_raise
from effref.longcontext.retnet import MultiScaleRetention

MIXERS = ("hyena", "retnet")


@dataclass(frozen=True)
class MixerLMConfig:
    mixer: str  # "hyena" or "retnet"
    vocab_size: int
    d_model: int
    n_layers: int
    d_ff: int
    n_heads: int = 4  # retnet only: heads of multi-scale retention (each its own decay γ)
    max_len: int = 1024  # longest sequence: Hyena's filters and RetNet's rotations are built up to it

    def __post_init__(self) -> None:
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer={self.mixer!r} is not known; use one of {MIXERS}")
        for name in ("vocab_size", "d_model", "n_layers", "d_ff", "n_heads", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")


class ParallelRetention(MultiScaleRetention):
    """Multi-scale retention as a plain (B, T, d) → (B, T, d) mixer: the parallel form, from position 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x, form="parallel")[0]


def make_mixer(cfg: MixerLMConfig) -> nn.Module:
    if cfg.mixer == "hyena":
        return HyenaOperator(cfg.d_model, cfg.max_len)
    return ParallelRetention(cfg.d_model, cfg.n_heads, max_len=cfg.max_len)


class MixerBlock(nn.Module):
    def __init__(self, cfg: MixerLMConfig):
        super().__init__()
        self.mixer_norm, self.ffn_norm = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.mixer = make_mixer(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x))  # (B, T, d)
        return x + self.ffn(self.ffn_norm(x))


class MixerLM(nn.Module):
    """A causal language model whose blocks mix tokens with Hyena or with retention: ids (B, T) → logits (B, T, V)."""

    def __init__(self, cfg: MixerLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(MixerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        token_ids_or_raise(input_ids, self.cfg.vocab_size)
        if input_ids.shape[-1] > self.cfg.max_len:
            raise ValueError(f"{input_ids.shape[-1]} tokens exceed max_len={self.cfg.max_len}; build the model "
                             "with a larger max_len")
        x = self.embed(input_ids)  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T  # (B, T, V): the head is the embedding, tied
