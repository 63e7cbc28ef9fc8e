"""LLaMA-Adapter: learnable adaptation prompts in the top layers, read through zero-initialised gated attention.

Paper: Zhang, Han, Liu, Zhou, Lu, Qiao, Li, Gao (2024), "LLaMA-Adapter: Efficient Fine-tuning of
Language Models with Zero-init Attention", arXiv:2303.16199 — §3.1 (adaptation prompts), §3.2 (Eqs. 6–9).
Implements: in each of the top L layers a prompt P_l ∈ ℝ^{K×d}; the layer's own projections give prompt keys
and values K_l = k_proj(P_l), V_l = v_proj(P_l) (no rotary position: the prompt has none). A query q
(with its rotary position) attends to the prompt with its own softmax, scaled by a gate:
   out = Attn(q, K, V) + tanh(g_l) · softmax(q K_lᵀ / √d_head) V_l        (per head; Eq. 8 with tanh gating)
and both parts go through o_proj. g_l starts at 0, so at initialisation the model is exactly unchanged and
the prompts' influence grows only as training finds it useful ("zero-init attention").
Glossary: K ``n_prompt`` (prompt length) · L ``n_layers`` (top layers adapted) · P_l ``prompt`` (K × d)
          · g_l ``gate`` (one per head) · d_head head width.
Left out: the multi-modal (image-conditioned) variant and LLaMA-Adapter V2's bias/scale tuning and early
          fusion; the paper's joint softmax over [prompt; tokens] is replaced by two separately normalised
          terms (the form of its released code and of peft's ``adaption_prompt``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from effref.models.llama import apply_rope
from effref.peft.core import freeze_base, replace_module


@dataclass
class LlamaAdapterConfig:
    n_prompt: int = 10  # K
    n_layers: int = 8  # L: the top L layers are adapted

    def __post_init__(self) -> None:
        if self.n_prompt < 1 or self.n_layers < 1:
            raise ValueError(f"n_prompt={self.n_prompt}, n_layers={self.n_layers}: both must be >= 1")


class AdaptedAttention(nn.Module):
    """An attention module (transformers' LlamaAttention or ours) plus a gated adaptation prompt."""

    def __init__(self, attn: nn.Module, n_prompt: int, n_heads: int, n_kv_heads: int, d_head: int):
        super().__init__()
        d_model = attn.q_proj.in_features
        w = attn.q_proj.weight
        self.attn, self.n_heads, self.n_kv_heads, self.d_head = attn, n_heads, n_kv_heads, d_head
        self.prompt = nn.Parameter(torch.randn(n_prompt, d_model, dtype=w.dtype, device=w.device))  # P_l: (K, d)
        self.gate = nn.Parameter(torch.zeros(n_heads, dtype=w.dtype, device=w.device))  # g_l = 0

    def prompt_term(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """o_proj(tanh(g) · softmax(q Kᵀ/√d_head) V) for hidden states x (B, T, d)."""
        B, T, _ = x.shape
        a = self.attn
        q = a.q_proj(x).view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, dh)
        if cos.dim() == 3:  # transformers passes (B, T, dh); ours (T, dh)
            cos, sin = cos[:, None], sin[:, None]
        q = apply_rope(q, cos, sin)
        K = len(self.prompt)
        k = a.k_proj(self.prompt).view(K, self.n_kv_heads, self.d_head).transpose(0, 1)  # (n_kv, K, dh)
        v = a.v_proj(self.prompt).view(K, self.n_kv_heads, self.d_head).transpose(0, 1)  # (n_kv, K, dh)
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)  # (H, K, dh)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(self.d_head)).float().softmax(-1).to(q.dtype)  # (B, H, T, K)
        y = torch.tanh(self.gate)[:, None, None] * (scores @ v)  # (B, H, T, dh), gated per head
        return a.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.d_head))  # (B, T, d)

    def forward(self, *args, **kwargs):
        out = self.attn(*args, **kwargs)
        if "hidden_states" in kwargs or isinstance(out, tuple):  # transformers: (output, weights)
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
            return (out[0] + self.prompt_term(x, cos, sin), *out[1:])
        x, cos, sin = args[:3]  # ours: forward(x, cos, sin, cache)
        return out + self.prompt_term(x, cos, sin)


def _attention_modules(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], int, int, int]:
    if hasattr(model, "config") and hasattr(model.config, "num_key_value_heads"):
        c = model.config
        heads, kv = c.num_attention_heads, c.num_key_value_heads
        d_head = getattr(c, "head_dim", None) or c.hidden_size // heads
        mods = [(n, m) for n, m in model.named_modules() if n.endswith("self_attn")]
    elif hasattr(model, "cfg") and hasattr(model, "blocks"):
        heads, kv, d_head = model.cfg.n_heads, model.cfg.n_kv_heads, model.cfg.d_head
        mods = [(f"blocks.{i}.attn", b.attn) for i, b in enumerate(model.blocks)]
    else:
        raise TypeError(f"{type(model).__name__} is not a LLaMA-like model; use transformers' "
                        "LlamaForCausalLM or effref.models.llama.Llama")
    return mods, heads, kv, d_head


def apply_llama_adapter(model: nn.Module, cfg: LlamaAdapterConfig) -> nn.Module:
    """Add gated adaptation prompts to the top ``cfg.n_layers`` attention layers; freeze the rest (in place)."""
    mods, heads, kv, d_head = _attention_modules(model)
    if cfg.n_layers > len(mods):
        raise ValueError(f"n_layers={cfg.n_layers} exceeds the model's {len(mods)} layers; use n_layers <= {len(mods)}")
    freeze_base(model)
    for name, attn in mods[len(mods) - cfg.n_layers:]:
        replace_module(model, name, AdaptedAttention(attn, cfg.n_prompt, heads, kv, d_head))
    return model
