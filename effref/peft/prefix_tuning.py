"""Prefix tuning and P-Tuning v2: trainable keys and values in front of every layer's attention.

Papers: Li, Liang (2021), "Prefix-Tuning: Optimizing Continuous Prompts for Generation", arXiv:2101.00190
— §4.2 (activations h_i = P_θ[i, :] for prefix positions), §4.3 (reparameterisation P_θ = MLP_θ(P'_θ));
Liu, Ji, Fu, Tam, Du, Yang, Tang (2022), "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning
Universally Across Scales and Tasks", arXiv:2110.07602 — §3.2 (deep prompts at every layer, no
reparameterisation by default).
Implements: for every layer l, n virtual positions with keys K_l^P and values V_l^P (n_kv heads × d_head
each) that every real token attends to, before its own causal keys: Attn(q, [K^P; K], [V^P; V]). The
prefixes come from one table E ∈ ℝ^{n×(L·2·n_kv·d_head)} (P-Tuning v2, ``reparameterize=False``) or from
E' ∈ ℝ^{n×n_kv·d_head} through Linear → tanh → Linear (prefix tuning's MLP, which the paper found to
stabilise training); after training the MLP can be discarded by storing its output. The real tokens sit
at positions n … n+T−1 (as when the prefix is a cache); the prefix keys carry no rotary position.
OPT and GPT-2 take the prefix through the same cache (one key/value head per head); their learned
absolute positions then also start at n, so n + T must fit their position table.
Layout of the flat prefix row (shared with peft, so weights copy over): [layer 0 K, layer 0 V, layer 1 K, …].
Glossary: n ``n_virtual`` · L layers · E ``embedding`` · MLP ``transform`` · K^P, V^P per-layer prefixes.
Left out: separate prefixes for encoder and decoder of seq2seq models; padding masks.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from effref.checks import config_or_default
from effref.models.calls import is_transformers_model
from effref.peft.core import freeze_base


@dataclass
class PrefixConfig:
    n_virtual: int = 10
    reparameterize: bool = True  # prefix tuning's MLP; False = P-Tuning v2 (and peft's default)
    hidden: int | None = None  # width of the MLP (default: n_kv · d_head, as peft)

    def __post_init__(self) -> None:
        if isinstance(self.n_virtual, bool) or not isinstance(self.n_virtual, int) or self.n_virtual < 1:
            raise ValueError(f"n_virtual={self.n_virtual!r} must be a positive number of prefix positions, e.g. 10")
        if self.hidden is not None and self.hidden < 1:
            raise ValueError(f"hidden={self.hidden} must be a positive MLP width (or None)")


def attention_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head width) of a transformers decoder (LLaMA-like, OPT, GPT-2) or of our Llama."""
    if is_transformers_model(model):
        c = model.config
        layers, heads, width = (getattr(c, k, None) for k in ("num_hidden_layers", "num_attention_heads",
                                                               "hidden_size"))
        if not (layers and heads and width):
            raise TypeError(f"cannot read the attention shape of {type(model).__name__}: its config lacks "
                            "num_hidden_layers, num_attention_heads or hidden_size; use a decoder-only causal LM")
        kv_heads = getattr(c, "num_key_value_heads", None) or heads  # OPT and GPT-2: one key/value head per head
        return layers, kv_heads, getattr(c, "head_dim", None) or width // heads
    if hasattr(model, "cfg") and hasattr(model.cfg, "n_kv_heads"):
        return model.cfg.n_layers, model.cfg.n_kv_heads, model.cfg.d_head
    raise TypeError(f"cannot read the attention shape of {type(model).__name__}; use a transformers causal LM "
                    "(LLaMA-like, OPT, GPT-2) or effref.models.llama.Llama")


class PrefixEncoder(nn.Module):
    """Produces the flat prefix table (n, L·2·n_kv·d_head), directly or through the reparameterisation MLP."""

    def __init__(self, n: int, layers: int, kv_width: int, reparameterize: bool, hidden: int | None,
                 like: torch.Tensor):
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        out = layers * 2 * kv_width
        if reparameterize:
            hidden = hidden or kv_width
            self.embedding = nn.Embedding(n, kv_width, **kw)  # E': (n, n_kv·d_head)
            self.transform = nn.Sequential(nn.Linear(kv_width, hidden, **kw), nn.Tanh(), nn.Linear(hidden, out, **kw))
        else:
            self.embedding = nn.Embedding(n, out, **kw)  # E: (n, L·2·n_kv·d_head)
            self.transform = None

    def forward(self) -> torch.Tensor:
        table = self.embedding.weight  # (n, ·)
        return self.transform(table) if self.transform is not None else table  # (n, L·2·n_kv·d_head)


class PrefixModel(nn.Module):
    """A frozen causal LM whose every attention layer also attends to n trainable prefix positions."""

    supports_logits_to_keep = True

    def __init__(self, model: nn.Module, cfg: PrefixConfig):
        super().__init__()
        self.model, self.n_virtual = model, cfg.n_virtual
        self.layers, self.n_kv, self.d_head = attention_shape(model)
        like = next(model.parameters())
        self.encoder = PrefixEncoder(cfg.n_virtual, self.layers, self.n_kv * self.d_head, cfg.reparameterize,
                                     cfg.hidden, like.detach())

    def prefixes(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(K_l^P, V_l^P)] per layer, each (B, n_kv, n, d_head)."""
        flat = self.encoder()  # (n, L·2·n_kv·d_head)
        kv = flat.view(self.n_virtual, 2 * self.layers, self.n_kv, self.d_head).permute(1, 2, 0, 3)  # (2L, n_kv, n, dh)
        kv = kv[:, None].expand(-1, batch, -1, -1, -1)  # (2L, B, n_kv, n, d_head)
        return [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(self.layers)]

    def forward(self, input_ids: torch.Tensor | None = None, logits_to_keep: int = 0,
                inputs_embeds: torch.Tensor | None = None, **unused) -> torch.Tensor:
        B, T = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        prefixes = self.prefixes(B)
        if is_transformers_model(self.model):
            from transformers import DynamicCache

            cache = DynamicCache(ddp_cache_data=prefixes, config=self.model.config)
            name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
            out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, use_cache=True,
                             logits_to_keep=logits_to_keep, **{name: cache})
            return out.logits  # (B, T or keep, V)
        if inputs_embeds is not None:
            raise TypeError("our Llama takes token ids only; pass input_ids")
        cache = self.model.new_cache(B, max_len=self.n_virtual + T)  # our Llama: write the prefix, then advance
        for layer, (k, v) in enumerate(prefixes):
            cache.update(layer, k, v)
        cache.advance(self.n_virtual)
        logits = self.model(input_ids, cache)  # (B, T, V): positions n … n+T−1, attending to the prefix
        return logits[:, -logits_to_keep:] if logits_to_keep else logits


def apply_prefix_tuning(model: nn.Module, cfg: PrefixConfig) -> PrefixModel:
    """Freeze ``model`` and return it wrapped with trainable per-layer prefixes."""
    cfg = config_or_default(cfg, PrefixConfig, "PrefixConfig(n_virtual=10)")
    wrapped = PrefixModel(model, cfg)  # built first: a model it cannot serve is refused before it is frozen
    freeze_base(model)
    return wrapped


def apply_ptuning_v2(model: nn.Module, n_virtual: int = 10) -> PrefixModel:
    """P-Tuning v2: deep prompts at every layer, trained directly (no reparameterisation MLP)."""
    return apply_prefix_tuning(model, PrefixConfig(n_virtual=n_virtual, reparameterize=False))
