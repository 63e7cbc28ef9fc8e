"""MEGABYTE: a byte-level language model that attends over patches globally and over bytes only inside a patch.

Paper: Yu et al. (2023), "MEGABYTE: Predicting Million-byte Sequences with Multiscale Transformers",
arXiv:2305.07185 — §2.2 (the three parts) and §2.3.1 (the cost).
Implements, for a byte sequence x of length T cut into K = T / P patches of P bytes:
  patch embedder   h^G_k = [E^G(x_{k,1}) ‖ … ‖ E^G(x_{k,P})] + E^pos_k      P byte embeddings of width D_G / P,
                                                                            concatenated into one vector of D_G
  global model     g = causal transformer over (pad, h^G_1, …, h^G_{K−1})  patches shifted by one, so patch k's
                                                                            output has seen only patches < k
  local model      l_{k,p} = W^GL g_{k,p} + E^L(x_{k,p−1})                 g_k cut back into P slices of D_G / P,
                   (x_{k,0} is a pad)                                       each projected to D_L; bytes shifted
                   logits_{k,p} = head(causal transformer over l_{k,1…P})   by one inside the patch; every patch
                                                                            is a separate short sequence
so byte (k, p) is predicted from the earlier patches (through the global model) and the earlier bytes of its own
patch (through the local model): an autoregressive model of x, with self-attention over K patches and K runs of
P bytes, O(T²/P² + T·P) score pairs instead of a byte transformer's O(T²) (``attention_pairs``).
Glossary: P ``patch_size`` · K patches · D_G ``d_global`` · D_L ``d_local`` · E^G ``global_bytes`` ·
          E^L ``local_bytes`` · W^GL ``global_to_local`` · E^pos ``patch_positions``.
Left out: the convolutional and strided-patch variants of §5, cross-patch attention in the local model (§2.3.3),
          cached generation (each new byte reruns the model on the prefix), and the paper's scale.
A sequence whose length is not a multiple of P is padded at its end and the padding's logits are cropped;
causality makes that exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from effref.checks import token_ids_or_raise


@dataclass
class MegabyteConfig:
    patch_size: int = 4
    d_global: int = 128
    d_local: int = 64
    n_global_layers: int = 2
    n_local_layers: int = 1
    n_heads: int = 4
    max_patches: int = 256
    vocab_size: int = 256  # bytes

    def __post_init__(self) -> None:
        for name in ("patch_size", "d_global", "d_local", "n_global_layers", "n_local_layers", "n_heads",
                     "max_patches", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if self.d_global % self.patch_size:
            raise ValueError(f"d_global={self.d_global} must be a multiple of patch_size={self.patch_size} (each "
                             f"byte of a patch gets d_global / patch_size dimensions); try "
                             f"d_global={self.patch_size * max(1, self.d_global // self.patch_size)}")
        for name in ("d_global", "d_local"):
            if getattr(self, name) % self.n_heads:
                raise ValueError(f"{name}={getattr(self, name)} is not divisible by n_heads={self.n_heads}; "
                                 "choose widths that are multiples of the head count")


def _causal_transformer(width: int, n_heads: int, n_layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(width, n_heads, 4 * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)


def _run_causal(stack: nn.TransformerEncoder, x: torch.Tensor) -> torch.Tensor:
    mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device, dtype=x.dtype)
    return stack(x, mask=mask, is_causal=True)


class Megabyte(nn.Module):
    """Bytes (B, T) -> next-byte logits (B, T, 256), through a global model over patches and a local one inside."""

    def __init__(self, cfg: MegabyteConfig):
        super().__init__()
        self.cfg = cfg
        slice_width = cfg.d_global // cfg.patch_size
        self.global_bytes = nn.Embedding(cfg.vocab_size, slice_width)
        self.global_pad = nn.Parameter(torch.zeros(cfg.d_global))  # the patch before the first one
        self.patch_positions = nn.Embedding(cfg.max_patches, cfg.d_global)
        self.global_model = _causal_transformer(cfg.d_global, cfg.n_heads, cfg.n_global_layers)
        self.global_to_local = nn.Linear(slice_width, cfg.d_local)
        self.local_bytes = nn.Embedding(cfg.vocab_size, cfg.d_local)
        self.local_pad = nn.Parameter(torch.zeros(cfg.d_local))  # the byte before a patch's first byte
        self.local_model = _causal_transformer(cfg.d_local, cfg.n_heads, cfg.n_local_layers)
        self.norm = nn.LayerNorm(cfg.d_local)
        self.head = nn.Linear(cfg.d_local, cfg.vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        token_ids_or_raise(ids, cfg.vocab_size)
        batch, length = ids.shape
        P = cfg.patch_size
        K = -(-length // P)  # patches, the last one padded
        if K > cfg.max_patches:
            raise ValueError(f"ids has {length} bytes = {K} patches of {P}, more than max_patches="
                             f"{cfg.max_patches}; cut the sequence or build the model with a larger max_patches")
        x = nn.functional.pad(ids, (0, K * P - length)).view(batch, K, P)  # (B, K, P)

        patches = self.global_bytes(x).reshape(batch, K, cfg.d_global)  # (B, K, D_G): P embeddings side by side
        pad = self.global_pad.expand(batch, 1, cfg.d_global)  # (B, 1, D_G)
        global_in = torch.cat([pad, patches[:, :-1]], dim=1) + self.patch_positions.weight[:K]  # (B, K, D_G)
        global_out = _run_causal(self.global_model, global_in)  # (B, K, D_G)

        from_global = self.global_to_local(global_out.view(batch, K, P, -1))  # (B, K, P, D_L)
        previous = self.local_bytes(x[..., :-1])  # (B, K, P − 1, D_L): byte p − 1 feeds position p
        first = self.local_pad.expand(batch, K, 1, cfg.d_local)  # (B, K, 1, D_L)
        local_in = from_global + torch.cat([first, previous], dim=2)  # (B, K, P, D_L)
        local_out = _run_causal(self.local_model, local_in.view(batch * K, P, cfg.d_local))  # (B·K, P, D_L)
        logits = self.head(self.norm(local_out)).view(batch, K * P, cfg.vocab_size)  # (B, K·P, 256)
        return logits[:, :length]


def attention_pairs(length: int, patch_size: int) -> tuple[int, int]:
    """Causal score pairs per layer: (MEGABYTE's global + local models, a byte-level transformer) (§2.3.1)."""
    if length < 1 or patch_size < 1:
        raise ValueError(f"length={length} and patch_size={patch_size} must be ≥ 1")
    K = -(-length // patch_size)
    megabyte = K * (K + 1) // 2 + K * patch_size * (patch_size + 1) // 2
    return megabyte, length * (length + 1) // 2
