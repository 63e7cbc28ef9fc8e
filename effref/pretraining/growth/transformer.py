"""The small GPT/BERT-style transformer that the growth operators and the initialisation schemes act on.

Papers: Vaswani et al. (2017), arXiv:1706.03762 (the post-LN block); Radford et al. (2019), GPT-2 (the pre-LN
block); Xiong et al. (2020), arXiv:2002.04745 (the two placements compared).
Implements: a causal decoder over learned token and position embeddings, with LayerNorm, multi-head attention
with biases and an ungated GELU MLP — the block structure of BERT and GPT-2, which bert2BERT and LiGO grow —
in one of three residual forms (``norm``), each sub-layer F (attention, then MLP) applied as
  post   x ← LN(α·x + g·F(x))          (BERT, the original Transformer; DeepNorm sets α > 1)
  pre    x ← x + g·F(LN(x))            (GPT-2; a final LN before the head)
  none   x ← x + g·F(x)                (no normalisation: Fixup, SkipInit, ReZero)
where g is a learnable scalar per sub-layer when ``residual_gain`` is set (else absent, i.e. 1) and α is the
fixed ``skip_scale``.
Glossary: d_model hidden size · n_heads heads of width d_head (fixed, so width growth adds heads) · d_ff MLP
          width · α skip_scale · g the residual gain (``attn_gain``, ``mlp_gain``).
Left out: dropout, padding masks, weight tying of the head (a tied head cannot be grown function-preservingly:
          the embedding's columns are copied, the head's would have to be divided).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from effref.checks import token_ids_or_raise

NORMS = ("post", "pre", "none")


@dataclass(frozen=True)
class TinyTransformerConfig:
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_head: int = 16
    d_ff: int = 256
    max_seq_len: int = 128
    norm: str = "post"  # where LayerNorm sits: "post", "pre" or "none"
    residual_gain: bool = False  # a learnable scalar g on every residual branch (ReZero, SkipInit, Fixup)
    skip_scale: float = 1.0  # α multiplying the skip path of a post-LN block (DeepNorm)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_head", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r} is not one of {NORMS}")
        if not self.skip_scale > 0:
            raise ValueError(f"skip_scale={self.skip_scale} must be > 0 (1 for a plain residual)")


class Attention(nn.Module):
    def __init__(self, cfg: TinyTransformerConfig):
        super().__init__()
        units = cfg.n_heads * cfg.d_head
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, units) for _ in range(3))
        self.o = nn.Linear(units, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, d_head)
                   for proj in (self.q, self.k, self.v))
        heads = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, d_head)
        return self.o(heads.transpose(1, 2).reshape(B, T, -1))  # (B, T, d_model)


class MLP(nn.Module):
    def __init__(self, cfg: TinyTransformerConfig):
        super().__init__()
        self.up, self.down = nn.Linear(cfg.d_model, cfg.d_ff), nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))  # (B, T, d_model)


class Block(nn.Module):
    def __init__(self, cfg: TinyTransformerConfig):
        super().__init__()
        self.norm, self.skip_scale = cfg.norm, cfg.skip_scale
        self.attn, self.mlp = Attention(cfg), MLP(cfg)
        if cfg.norm != "none":
            self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        if cfg.residual_gain:
            self.attn_gain, self.mlp_gain = nn.Parameter(torch.ones(())), nn.Parameter(torch.ones(()))

    def residual(self, x: torch.Tensor, branch: nn.Module, norm: str, gain: str) -> torch.Tensor:
        g = getattr(self, gain, None)
        scaled = (lambda y: y) if g is None else (lambda y: g * y)
        if self.norm == "post":
            return getattr(self, norm)(self.skip_scale * x + scaled(branch(x)))
        if self.norm == "pre":
            return x + scaled(branch(getattr(self, norm)(x)))
        return x + scaled(branch(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.residual(x, self.attn, "ln1", "attn_gain")  # (B, T, d_model)
        return self.residual(x, self.mlp, "ln2", "mlp_gain")


class TinyTransformer(nn.Module):
    def __init__(self, cfg: TinyTransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        if cfg.norm == "pre":
            self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):  # GPT-2's N(0, 0.02²), zero biases
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        token_ids_or_raise(input_ids, self.cfg.vocab_size)
        T = input_ids.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"{T} tokens exceed max_seq_len={self.cfg.max_seq_len}; pass shorter windows")
        x = self.tok(input_ids) + self.pos(torch.arange(T, device=input_ids.device))  # (B, T, d_model)
        for block in self.blocks:
            x = block(x)
        if self.cfg.norm == "pre":
            x = self.ln_f(x)
        return self.head(x)  # (B, T, V)
