"""Mixtral: a Mistral decoder whose MLPs are sparse MoE layers with top-2 softmax routing.

Paper: Jiang, Sablayrolles, Roux, Mensch, Savary, Bamford, Chaplot, de las Casas, Hanna, Bressand, Lengyel,
Bour, Lample, Lavaud, Saulnier, Lachaux, Stock, Subramanian, Yang, Antoniak, Le Scao, Gervet, Lavril, Wang,
Lacroix, El Sayed (2024), "Mixtral of Experts", arXiv:2401.04088 — §2.1 (Eqs. 1–2).
Implements: router logits x · W_g, the top-K of them, a softmax over the chosen K only,
G(x) = Softmax(TopK(x · W_g)) (Eq. 1), and the output  y = Σ_i G(x)_i · SwiGLU_i(x)  (Eq. 2), with no capacity:
no token is ever dropped. The rest of the block is our LLaMA (RoPE, RMSNorm, grouped-query attention), of which
Mixtral is a subclass here. ``from_hf`` loads transformers' MixtralForCausalLM (v5's fused expert tensors,
``gate_up_proj`` (E, 2F, D) and ``down_proj`` (E, D, F), or v4's per-expert w1/w2/w3); ``save_mixtral`` and
``load_mixtral`` store and restore one exactly (safetensors, the config in the header). ``set_routers`` swaps
every layer's router (Switch, GShard, Expert Choice, BASE, StableMoE) to train the same model other ways.
Glossary: E n_experts (Mixtral 8x7B: 8) · K top_k (2) · W_g ``router.gate.weight`` (E × D) · F d_ff of one expert
          · the auxiliary loss α · E · Σ f_i P_i of Switch, with f_i counting both choices (as in transformers).
Left out: sliding-window attention past the window (max_seq_len becomes the window), router jitter noise,
          transformers' pooling of the balancing loss over layers (ours adds the layers' losses, as Switch does).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from effref.models.llama import Llama, LlamaConfig, RopeScaling
from effref.moe.experts import Experts, MoELayer, Routing, check_experts, moe_layers
from effref.moe.switch import load_balancing_loss

if TYPE_CHECKING:
    import transformers


class TopKRouter(nn.Module):
    """Mixtral's router: G(x) = Softmax(TopK(x · W_g)), every token to exactly K experts."""

    def __init__(self, d_model: int, n_experts: int, top_k: int = 2, aux_coef: float = 0.0):
        super().__init__()
        check_experts(n_experts, top_k)
        if aux_coef < 0:
            raise ValueError(f"aux_coef={aux_coef} must be ≥ 0 (0: no balancing loss; transformers: 0.001)")
        self.n_experts, self.top_k, self.aux_coef = n_experts, top_k, aux_coef
        self.gate = nn.Linear(d_model, n_experts, bias=False)  # W_g

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        T = x.shape[0]
        logits = self.gate(x).float()  # (T, E)
        top = logits.topk(self.top_k, dim=-1)  # (T, K) logits and expert indices
        weight = top.values.softmax(-1)  # (T, K) Eq. 1: softmax over the chosen K only
        probs = logits.softmax(-1)  # (T, E) for the balancing loss and statistics
        token = torch.arange(T, device=x.device).repeat_interleave(self.top_k)  # (T·K,)
        aux = self.aux_coef * load_balancing_loss(probs, top.indices)
        return Routing(token, top.indices.reshape(-1), weight.reshape(-1), probs, aux)


@dataclass
class MixtralConfig(LlamaConfig):
    """LLaMA's config plus the experts; ``d_ff`` is the width of one expert."""

    n_experts: int = 8
    top_k: int = 2
    aux_coef: float = 0.0  # α of the balancing loss (transformers: router_aux_loss_coef = 0.001)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_experts(self.n_experts, self.top_k)

    @classmethod
    def from_hf(cls, hf_config: transformers.PretrainedConfig) -> MixtralConfig:
        """Read a transformers MixtralConfig (v4 ``rope_theta`` or v5 ``rope_parameters``)."""
        if getattr(hf_config, "model_type", None) != "mixtral":
            raise ValueError(f"hf_config must be a MixtralConfig, got model_type="
                             f"{getattr(hf_config, 'model_type', None)!r}; for LLaMA-shaped models use "
                             "LlamaConfig.from_hf")
        rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"rope scaling {rope} is not supported; only the default RoPE is implemented")
        if hf_config.hidden_act != "silu":
            raise ValueError(f"hf_config.hidden_act={hf_config.hidden_act!r}: Mixtral's experts are SwiGLU")
        d_model, n_heads = hf_config.hidden_size, hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or d_model // n_heads
        max_seq_len = hf_config.max_position_embeddings
        if hf_config.sliding_window is not None:
            max_seq_len = min(max_seq_len, hf_config.sliding_window)  # exact up to the window
        return cls(vocab_size=hf_config.vocab_size, d_model=d_model, n_layers=hf_config.num_hidden_layers,
                   n_heads=n_heads, n_kv_heads=hf_config.num_key_value_heads or n_heads,
                   d_ff=hf_config.intermediate_size,
                   rope_theta=float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 1e6))),
                   norm_eps=hf_config.rms_norm_eps, max_seq_len=max_seq_len,
                   tie_embeddings=bool(hf_config.tie_word_embeddings),
                   head_dim=None if head_dim * n_heads == d_model else head_dim,
                   n_experts=hf_config.num_local_experts, top_k=hf_config.num_experts_per_tok,
                   aux_coef=hf_config.router_aux_loss_coef)


class Mixtral(Llama):
    """Our LLaMA with every block's MLP replaced by an MoE layer of ``n_experts`` SwiGLU experts."""

    def __init__(self, cfg: MixtralConfig):
        if not isinstance(cfg, MixtralConfig):
            raise TypeError(f"cfg must be a MixtralConfig, got {type(cfg).__name__}; build one with "
                            "MixtralConfig(n_experts=8, top_k=2, ...)")
        super().__init__(cfg)
        for block in self.blocks:
            router = TopKRouter(cfg.d_model, cfg.n_experts, cfg.top_k, cfg.aux_coef)
            nn.init.normal_(router.gate.weight, std=0.02)
            block.mlp = MoELayer(router, Experts(cfg.n_experts, cfg.d_model, cfg.d_ff))

    def forward(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """Logits (B, T, vocab); every MoE layer keeps its routing (``moe_layers(model)[i].routing``)."""
        for layer in moe_layers(self):
            layer.token_ids = input_ids  # for routers that route by token identity (StableMoE's distilled one)
        return super().forward(input_ids, cache)

    def aux_loss(self) -> torch.Tensor:
        """The sum of the layers' auxiliary losses from the last forward call."""
        return torch.stack([layer.routing.aux_loss for layer in moe_layers(self)]).sum()

    def active_parameters(self) -> int:
        """Parameters one token uses: all but the experts it skips, layer by layer (a router's ``top_k``, else 1
        expert per token; router, attention and embeddings included)."""
        skipped = 0
        for layer in moe_layers(self):
            per_expert = sum(p.numel() for p in layer.experts.parameters()) // layer.experts.n_experts
            skipped += (layer.experts.n_experts - getattr(layer.router, "top_k", 1)) * per_expert
        return self.num_parameters() - skipped

    @classmethod
    def from_hf(cls, hf_model: transformers.PreTrainedModel) -> Mixtral:
        """Our model with the weights, dtype and device of a transformers MixtralForCausalLM."""
        cfg = MixtralConfig.from_hf(getattr(hf_model, "config", None))
        weight = hf_model.get_input_embeddings().weight
        model = cls(cfg).to(device=weight.device, dtype=weight.dtype)
        hf = hf_model.state_dict()
        state = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
                 "lm_head.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"])}
        F = cfg.d_ff
        for i in range(cfg.n_layers):
            src, dst = f"model.layers.{i}.", f"blocks.{i}."
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                state[f"{dst}attn.{p}.weight"] = hf[f"{src}self_attn.{p}.weight"]
            state[f"{dst}attn_norm.weight"] = hf[f"{src}input_layernorm.weight"]
            state[f"{dst}mlp_norm.weight"] = hf[f"{src}post_attention_layernorm.weight"]
            if f"{src}mlp.experts.gate_up_proj" in hf:  # transformers 5: fused (E, 2F, D) and (E, D, F)
                state[f"{dst}mlp.router.gate.weight"] = hf[f"{src}mlp.gate.weight"]
                gate_up = hf[f"{src}mlp.experts.gate_up_proj"]
                gate, up, down = gate_up[:, :F], gate_up[:, F:], hf[f"{src}mlp.experts.down_proj"]
            else:  # transformers 4: block_sparse_moe.experts.{e}.w1 (gate), w3 (up), w2 (down), nn.Linear each
                moe = f"{src}block_sparse_moe."
                state[f"{dst}mlp.router.gate.weight"] = hf[f"{moe}gate.weight"]
                gate, up, down = (torch.stack([hf[f"{moe}experts.{e}.{w}.weight"] for e in range(cfg.n_experts)])
                                  for w in ("w1", "w3", "w2"))
            state[f"{dst}mlp.experts.gate"], state[f"{dst}mlp.experts.up"] = gate, up
            state[f"{dst}mlp.experts.down"] = down
        model.load_state_dict(state, strict=True)
        return model.eval()


def set_routers(model: Mixtral, make_router: Callable[[int], nn.Module]) -> Mixtral:
    """Give layer i the router ``make_router(i)`` (same number of experts); returns the model."""
    for i, layer in enumerate(moe_layers(model)):
        router = make_router(i)
        if getattr(router, "n_experts", None) != layer.experts.n_experts:
            raise ValueError(f"make_router({i}) built a router for {getattr(router, 'n_experts', None)} experts; "
                             f"layer {i} has {layer.experts.n_experts}")
        layer.router = router.to(layer.experts.gate.device)
    return model


_CONFIG_KEY = "effref.mixtral_config"


def save_mixtral(model: Mixtral, path: str | Path) -> int:
    """Save every tensor (bit for bit) and the config to one safetensors file; returns its size in bytes."""
    if not isinstance(model, Mixtral):
        raise TypeError(f"model must be effref's Mixtral, got {type(model).__name__}")
    routers = {type(layer.router).__name__ for layer in moe_layers(model)}
    if routers != {"TopKRouter"}:
        raise ValueError(f"save_mixtral stores Mixtral's TopKRouter layers; this model has {sorted(routers)} "
                         "(save a model with other routers with torch.save(model.state_dict()))")
    save_model(model, str(path), metadata={_CONFIG_KEY: json.dumps(asdict(model.cfg))})
    return Path(path).stat().st_size


def load_mixtral(path: str | Path) -> Mixtral:
    """The model ``save_mixtral`` wrote, rebuilt from its config and filled with ``strict=True``."""
    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get(_CONFIG_KEY)
    if meta is None:
        raise ValueError(f"{path} has no {_CONFIG_KEY} header; it was not written by save_mixtral")
    known = {f.name for f in fields(MixtralConfig)}
    values = {k: v for k, v in json.loads(meta).items() if k in known}
    if isinstance(values.get("rope_scaling"), dict):  # asdict wrote the nested RopeScaling as a JSON object
        values["rope_scaling"] = RopeScaling(**values["rope_scaling"])
    model = Mixtral(MixtralConfig(**values))
    load_model(model, str(path), strict=True)
    return model.eval()
