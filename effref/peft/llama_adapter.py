"""LLaMA-Adapter: learnable adaptation prompts in the top layers, read through zero-initialised gated attention.

Paper: Zhang, Han, Liu, Zhou, Lu, Qiao, Li, Gao (2024), "LLaMA-Adapter: Efficient Fine-tuning of
Language Models with Zero-init Attention", arXiv:2303.16199 — §3.1 (adaptation prompts), §3.2 (Eqs. 6–9).
Implements: in each of the top L layers a prompt P_l ∈ ℝ^{K×d}; the layer's own projections give prompt keys
and values K_l = k_proj(P_l), V_l = v_proj(P_l) (no rotary position: the prompt has none). A query q
(with its rotary position) attends to the prompt with its own softmax, scaled by a gate:
   out = Attn(q, K, V) + tanh(g_l) · softmax(q K_lᵀ / √d_head) V_l        (per head; Eq. 8 with tanh gating)
and both parts go through o_proj (o_proj's bias once: the prompt's part skips it). g_l starts at 0, so at
initialisation the model is exactly unchanged and the prompts' influence grows only as training finds it
useful ("zero-init attention").
Glossary: K ``n_prompt`` (prompt length) · L ``n_layers`` (top layers adapted) · P_l ``prompt`` (K × d)
          · g_l ``gate`` (one per head) · d_head head width.
Also on OPT and GPT-2: their attention's own projections (GPT-2's fused c_attn split into q, k, v), no rotation
of q (their positions are learned and added at the input), the model's own attention scale.
Left out: the multi-modal (image-conditioned) variant and LLaMA-Adapter V2's bias/scale tuning and early
          fusion; the paper's joint softmax over [prompt; tokens] is replaced by two separately normalised
          terms (the form of its released code and of peft's ``adaption_prompt``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from effref.checks import config_or_default
from effref.models.llama import apply_rope
from effref.peft.core import freeze_base, is_linear_like, layout_of, replace_all


@dataclass
class LlamaAdapterConfig:
    n_prompt: int = 10  # K
    n_layers: int = 8  # L: the top L layers are adapted

    def __post_init__(self) -> None:
        if self.n_prompt < 1 or self.n_layers < 1:
            raise ValueError(f"n_prompt={self.n_prompt}, n_layers={self.n_layers}: both must be >= 1")


PROJECTIONS = {  # the attention's own linears, per architecture: query, key, value (or fused qkv), output
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),  # LLaMA, Mistral, Qwen2, Gemma, our Llama: with RoPE
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),  # learned absolute positions, added at the input
    "gpt2": ("c_attn", "c_proj"),  # q, k, v fused in one c_attn (3·d wide); learned absolute positions
}


def attention_kind(attn: nn.Module) -> str:
    """Which of ``PROJECTIONS`` the attention module ``attn`` has; TypeError naming what is missing."""
    for kind, names in PROJECTIONS.items():
        if all(is_linear_like(getattr(attn, name, None)) for name in names):
            return kind
    raise TypeError(f"{type(attn).__name__} has none of the projection sets LLaMA-Adapter reads {PROJECTIONS}; "
                    "use a LLaMA-like model (LLaMA, Mistral, Qwen2, Gemma, our Llama), OPT or GPT-2 with its "
                    "Conv1D layers converted by effref.models.conv1d.linear_from_conv1d")


class AdaptedAttention(nn.Module):
    """An attention module (transformers' LLaMA-like, OPT or GPT-2 attention, or ours) plus a gated prompt."""

    def __init__(self, attn: nn.Module, n_prompt: int, n_heads: int, n_kv_heads: int, d_head: int):
        super().__init__()
        self.kind = attention_kind(attn)
        first = getattr(attn, PROJECTIONS[self.kind][0])
        floats = [t for t in (*first.parameters(), *first.buffers()) if t.is_floating_point()]  # quantized: scales
        kw = {"dtype": floats[0].dtype, "device": floats[0].device} if floats else {}
        d_model = first.in_features
        self.attn, self.n_heads, self.n_kv_heads, self.d_head = attn, n_heads, n_kv_heads, d_head
        self.scale = getattr(attn, "scaling", None) or 1 / math.sqrt(d_head)  # the model's own 1/√d_head
        self.prompt = nn.Parameter(torch.randn(n_prompt, d_model, **kw))  # P_l: (K, d)
        self.gate = nn.Parameter(torch.zeros(n_heads, **kw))  # g_l = 0

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's queries of x (B, T, d): (B, T, H·d_head)."""
        if self.kind == "gpt2":
            return self.attn.c_attn(x)[..., :self.n_heads * self.d_head]  # c_attn(x) = [q | k | v]
        return self.attn.q_proj(x)

    def prompt_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K_l, V_l of the prompt through the layer's own projections, each (n_kv, K, d_head)."""
        if self.kind == "gpt2":
            _, k, v = self.attn.c_attn(self.prompt).split(self.n_heads * self.d_head, dim=-1)  # (K, d) each
        else:
            k, v = self.attn.k_proj(self.prompt), self.attn.v_proj(self.prompt)  # (K, n_kv·d_head) each
        K = len(self.prompt)
        return (k.view(K, self.n_kv_heads, self.d_head).transpose(0, 1),
                v.view(K, self.n_kv_heads, self.d_head).transpose(0, 1))

    def prompt_term(self, x: torch.Tensor, cos: torch.Tensor | None = None,
                    sin: torch.Tensor | None = None) -> torch.Tensor:
        """out_proj(tanh(g) · softmax(q Kᵀ/√d_head) V) for hidden states x (B, T, d); cos, sin: RoPE or None."""
        B, T, _ = x.shape
        q = self.query(x).view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, dh)
        if cos is not None:
            if cos.dim() == 3:  # transformers passes (B, T, dh); ours (T, dh)
                cos, sin = cos[:, None], sin[:, None]
            q = apply_rope(q, cos, sin)
        k, v = self.prompt_keys_values()  # (n_kv, K, dh) each
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)  # (H, K, dh)
        scores = (q @ k.transpose(-1, -2) * self.scale).float().softmax(-1).to(q.dtype)  # (B, H, T, K)
        y = torch.tanh(self.gate)[:, None, None] * (scores @ v)  # (B, H, T, dh), gated per head
        out_proj = getattr(self.attn, PROJECTIONS[self.kind][-1])  # o_proj (OPT: out_proj, GPT-2: c_proj)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.d_head)  # (B, T, H·dh)
        return out_proj(y) - out_proj(y.new_zeros(y.shape[-1]))  # (B, T, d): W y, the bias is in Attn's part

    def forward(self, *args, **kwargs):
        out = self.attn(*args, **kwargs)
        if "hidden_states" in kwargs or isinstance(out, tuple):  # transformers: (output, weights)
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos = sin = None
            if self.kind == "llama":  # RoPE angles; OPT and GPT-2 add their positions at the input instead
                cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
            return (out[0] + self.prompt_term(x, cos, sin), *out[1:])
        x, cos, sin = args[:3]  # ours: forward(x, cos, sin, cache)
        return out + self.prompt_term(x, cos, sin)


def _attention_modules(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], int, int, int]:
    if hasattr(model, "config") and hasattr(model.config, "num_attention_heads"):
        c = model.config
        heads = c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or heads  # OPT and GPT-2: one key/value head per head
        d_head = getattr(c, "head_dim", None) or c.hidden_size // heads
        block = layout_of(model).attention  # "self_attn"; GPT-2: "attn"
        mods = [(n, m) for n, m in model.named_modules() if n.endswith("." + block)]
    elif hasattr(model, "cfg") and hasattr(model, "blocks"):
        heads, kv, d_head = model.cfg.n_heads, model.cfg.n_kv_heads, model.cfg.d_head
        mods = [(f"blocks.{i}.attn", b.attn) for i, b in enumerate(model.blocks)]
    else:
        raise TypeError(f"{type(model).__name__} is not a LLaMA-like model, OPT or GPT-2; use a transformers "
                        "causal LM of those families or effref.models.llama.Llama")
    adapted = [n for n, m in mods if isinstance(m, AdaptedAttention)]
    if adapted:
        raise ValueError(f"{adapted[0]} already carries a LLaMA-Adapter prompt; apply the method once")
    return mods, heads, kv, d_head


def apply_llama_adapter(model: nn.Module, cfg: LlamaAdapterConfig) -> nn.Module:
    """Add gated adaptation prompts to the top ``cfg.n_layers`` attention layers; freeze the rest (in place)."""
    cfg = config_or_default(cfg, LlamaAdapterConfig, "LlamaAdapterConfig(n_prompt=10, n_layers=8)")
    mods, heads, kv, d_head = _attention_modules(model)
    if cfg.n_layers > len(mods):
        raise ValueError(f"n_layers={cfg.n_layers} exceeds the model's {len(mods)} layers; use n_layers <= {len(mods)}")
    adapted = {name: AdaptedAttention(attn, cfg.n_prompt, heads, kv, d_head)  # all built before any change
               for name, attn in mods[len(mods) - cfg.n_layers:]}
    freeze_base(model)
    replace_all(model, adapted)
    return model
