"""RWKV-4: an RNN that trains like a transformer, its attention replaced by a decaying weighted average (WKV).

Paper: Peng et al. (2023), "RWKV: Reinventing RNNs for the Transformer Era", arXiv:2305.13048 — §3 (token shift,
the WKV operator, output gating, channel mixing; time-parallel training and RNN-like inference).
Implements, with x̃ = μ ⊙ x_t + (1 − μ) ⊙ x_{t−1} the token shift (a separate μ for each of r, k, v):
  time mixing     r_t = W_r x̃,  k_t = W_k x̃,  v_t = W_v x̃,  o_t = W_o (σ(r_t) ⊙ wkv_t),
                  wkv_t = (Σ_{i<t} e^{−(t−1−i)w + k_i} v_i + e^{u + k_t} v_t)
                          / (Σ_{i<t} e^{−(t−1−i)w + k_i} + e^{u + k_t})            (per channel c)
  channel mixing  o'_t = σ(W'_r x̃) ⊙ W'_v max(W'_k x̃, 0)²
  block           x ← x + TimeMix(LN₁(x)),  x ← x + ChannelMix(LN₂(x))  (block 0 first applies LN₀ to x),
in two forms that agree: the *parallel* form evaluates wkv_t for all t at once, as a softmax over i of the
log-weights ℓ_{t,i} = k_i − (t−1−i)w (i < t), u + k_t (i = t), taken in chunks that carry the state (memory
O(chunk² · C), not O(T²)); the *recurrent* form keeps per channel a numerator a, a denominator b and their common
scale p (the running maximum exponent, so that e^{k} never overflows), updated once per token:
  wkv_t = (e^{p−q} a + e^{u+k_t−q} v_t) / (e^{p−q} b + e^{u+k_t−q}),   q = max(p, u + k_t)
  p' = max(p − w, k_t),  a' = e^{p−w−p'} a + e^{k_t−p'} v_t,  b' = e^{p−w−p'} b + e^{k_t−p'}.
Weights and outputs equal transformers' ``RwkvForCausalLM`` (``RWKV.from_hf``, its CPU path).
Glossary: w = exp(time_decay) > 0 per-channel decay rate · u = time_first (the current token's bonus) · μ =
          time_mix_* · C = d_attn channels of the time mixing · d_ff the channel mixing's width · (a, b, p) the
          WKV state · state per layer also holds x_{t−1} for each of the two token shifts.
Left out: RWKV-5/6 (matrix-valued states, data-dependent decay), the CUDA WKV kernel, transformers'
          ``rescale_every`` halving (an fp16 overflow guard; ``from_hf`` undoes it), head-wise "multi-head" W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from effref.alternatives.recurrent import RecurrentLM

if TYPE_CHECKING:
    import transformers

EMPTY = -1e38  # p of an empty state: e^{p} = 0, so a = b = 0 contribute nothing


@dataclass
class RWKVConfig:
    vocab_size: int = 50277
    d_model: int = 768
    n_layers: int = 12
    d_attn: int | None = None  # C; None: d_model
    d_ff: int | None = None  # None: 4 · d_model
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    chunk: int = 16  # the parallel form's tokens per chunk: work and memory O(T · chunk · C) per layer

    def __post_init__(self) -> None:
        self.d_attn = self.d_model if self.d_attn is None else self.d_attn
        self.d_ff = 4 * self.d_model if self.d_ff is None else self.d_ff
        for name in ("vocab_size", "d_model", "n_layers", "d_attn", "d_ff", "chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")

    @classmethod
    def from_hf(cls, hf_config: transformers.RwkvConfig) -> RWKVConfig:
        if getattr(hf_config, "model_type", None) != "rwkv":
            raise ValueError(f"hf_config is a {type(hf_config).__name__}, not an RWKV (v4) config")
        return cls(vocab_size=hf_config.vocab_size, d_model=hf_config.hidden_size,
                   n_layers=hf_config.num_hidden_layers, d_attn=hf_config.attention_hidden_size,
                   d_ff=hf_config.intermediate_size, norm_eps=hf_config.layer_norm_epsilon,
                   tie_embeddings=bool(hf_config.tie_word_embeddings))


WKVState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (a, b, p), each (B, C)


def empty_wkv_state(k: torch.Tensor) -> WKVState:
    zeros = torch.zeros_like(k[:, 0], dtype=torch.float32)  # (B, C)
    return zeros, zeros.clone(), torch.full_like(zeros, EMPTY)


def wkv_recurrent(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  state: WKVState | None = None) -> tuple[torch.Tensor, WKVState]:
    """wkv_t for k, v of shape (B, T, C), one token after the other with the running maximum; w, u: (C,).
    Returns wkv (B, T, C) and the state after the last token."""
    a, b, p = empty_wkv_state(k) if state is None else state  # (B, C) each
    out = []
    for t in range(k.shape[1]):
        kt, vt = k[:, t].float(), v[:, t].float()  # (B, C)
        q = torch.maximum(p, u + kt)  # the output's scale
        e1, e2 = torch.exp(p - q), torch.exp(u + kt - q)
        out.append((e1 * a + e2 * vt) / (e1 * b + e2))  # (B, C)   wkv_t
        p_next = torch.maximum(p - w, kt)  # decay the past by e^{−w}, add token t
        e1, e2 = torch.exp(p - w - p_next), torch.exp(kt - p_next)
        a, b, p = e1 * a + e2 * vt, e1 * b + e2, p_next
    return torch.stack(out, dim=1), (a, b, p)  # (B, T, C)


def wkv_parallel(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 state: WKVState | None = None) -> tuple[torch.Tensor, WKVState]:
    """The same wkv and final state as :func:`wkv_recurrent`, every t at once (O(T² · C) memory per sequence).

    The incoming state acts as one more "token" before t = 0, with log-weight p − t·w at time t.
    """
    a0, b0, p0 = empty_wkv_state(k) if state is None else state  # (B, C) each
    k, v = k.float(), v.float()
    T = k.shape[1]
    t = torch.arange(T, device=k.device)
    rel = (t[None, :] - t[:, None] + 1).float()[..., None]  # (T, T, 1): i − t + 1, i.e. −(t − 1 − i)
    bias = torch.where((t[:, None] == t[None, :])[..., None], u, rel * w)  # (T, T, C): u on the diagonal
    bias = bias.masked_fill((t[None, :] > t[:, None])[..., None], float("-inf"))  # i > t: the future
    logits = k[:, None] + bias  # (B, T, T, C): ℓ_{t,i} = k_i − (t−1−i)w, or u + k_t when i = t
    s = p0[:, None] - t[None, :, None] * w  # (B, T, C): the state's log-weight at time t
    m = torch.maximum(logits.amax(dim=2), s).detach()  # (B, T, C): a common scale, as in a softmax
    e, es = torch.exp(logits - m[:, :, None]), torch.exp(s - m)  # (B, T, T, C), (B, T, C)
    num = torch.einsum("btic,bic->btc", e, v) + es * a0[:, None]  # (B, T, C)
    den = e.sum(dim=2) + es * b0[:, None]  # (B, T, C)
    # the state after token T − 1: Σ_i e^{k_i − (T−1−i)w} v_i, plus the old state decayed T times
    last = k - (T - 1 - t)[None, :, None] * w  # (B, T, C)
    s_last = p0 - T * w  # (B, C)
    p = torch.maximum(last.amax(dim=1), s_last).detach()  # (B, C)
    e, es = torch.exp(last - p[:, None]), torch.exp(s_last - p)
    return num / den, (es * a0 + (e * v).sum(1), es * b0 + e.sum(1), p)


class RWKVState:
    """Per layer: x_{t−1} for each token shift and the WKV state (a, b, p); size independent of the length."""

    def __init__(self, cfg: RWKVConfig, batch_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.batch_size, self.length = batch_size, 0
        L, B = cfg.n_layers, batch_size
        self.shift_time = [torch.zeros(B, cfg.d_model, dtype=dtype, device=device) for _ in range(L)]
        self.shift_channel = [torch.zeros(B, cfg.d_model, dtype=dtype, device=device) for _ in range(L)]
        self.wkv = [empty_wkv_state(torch.zeros(B, 1, cfg.d_attn, device=device)) for _ in range(L)]

    def nbytes(self) -> int:
        tensors = self.shift_time + self.shift_channel + [t for s in self.wkv for t in s]
        return sum(t.numel() * t.element_size() for t in tensors)


def token_shift(x: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """x_{t−1} for every t of x (B, T, d): the last token of the previous call (or zeros) comes first."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if previous is None else previous[:, None].to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)  # (B, T, d)


def mix(x: torch.Tensor, shifted: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    return x * mu + shifted * (1 - mu)  # x̃ = μ ⊙ x_t + (1 − μ) ⊙ x_{t−1}


class TimeMix(nn.Module):
    def __init__(self, cfg: RWKVConfig, layer: int):
        super().__init__()
        self.layer, self.chunk = layer, cfg.chunk
        d, C = cfg.d_model, cfg.d_attn
        # the official initialisation: decay rates spread over channels, faster in lower layers
        depth, rest = layer / max(cfg.n_layers - 1, 1), 1.0 - layer / cfg.n_layers  # 0 → 1, 1 → ~0
        h = torch.arange(C, dtype=torch.float32) / max(C - 1, 1)
        self.time_decay = nn.Parameter(-5 + 8 * h ** (0.7 + 1.3 * depth))  # (C,)   log w
        zigzag = 0.5 * (((torch.arange(C) + 1) % 3) - 1).float()
        self.time_first = nn.Parameter(math.log(0.3) + zigzag)  # (C,)   u
        ramp = (torch.arange(d, dtype=torch.float32) / d)[None, None]  # (1, 1, d)
        self.time_mix_key = nn.Parameter(ramp**rest)
        self.time_mix_value = nn.Parameter(ramp**rest + 0.3 * depth)
        self.time_mix_receptance = nn.Parameter(ramp ** (0.5 * rest))
        self.key, self.value = nn.Linear(d, C, bias=False), nn.Linear(d, C, bias=False)
        self.receptance, self.output = nn.Linear(d, C, bias=False), nn.Linear(C, d, bias=False)

    def forward(self, x: torch.Tensor, state: RWKVState | None = None) -> torch.Tensor:
        shifted = token_shift(x, None if state is None else state.shift_time[self.layer])  # (B, T, d)
        if state is not None:
            state.shift_time[self.layer] = x[:, -1]
        k = self.key(mix(x, shifted, self.time_mix_key))  # (B, T, C)
        v = self.value(mix(x, shifted, self.time_mix_value))  # (B, T, C)
        r = torch.sigmoid(self.receptance(mix(x, shifted, self.time_mix_receptance)))  # (B, T, C)
        w, u = torch.exp(self.time_decay.float()), self.time_first.float()  # (C,) each
        wkv_state = None if state is None else state.wkv[self.layer]
        if x.shape[1] == 1:  # generation: one recurrent step
            wkv, wkv_state = wkv_recurrent(w, u, k, v, wkv_state)
        else:  # a sequence: the parallel form, chunk by chunk, each chunk continuing the previous one's state
            parts = []
            for start in range(0, x.shape[1], self.chunk):
                part, wkv_state = wkv_parallel(w, u, k[:, start:start + self.chunk],
                                               v[:, start:start + self.chunk], wkv_state)
                parts.append(part)
            wkv = torch.cat(parts, dim=1)  # (B, T, C)
        if state is not None:
            state.wkv[self.layer] = wkv_state
        return self.output(r * wkv.to(r.dtype))  # (B, T, d)


class ChannelMix(nn.Module):
    def __init__(self, cfg: RWKVConfig, layer: int):
        super().__init__()
        self.layer = layer
        d, rest = cfg.d_model, 1.0 - layer / cfg.n_layers
        ramp = (torch.arange(d, dtype=torch.float32) / d)[None, None]  # (1, 1, d)
        self.time_mix_key, self.time_mix_receptance = nn.Parameter(ramp**rest), nn.Parameter(ramp**rest)
        self.key, self.value = nn.Linear(d, cfg.d_ff, bias=False), nn.Linear(cfg.d_ff, d, bias=False)
        self.receptance = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, state: RWKVState | None = None) -> torch.Tensor:
        shifted = token_shift(x, None if state is None else state.shift_channel[self.layer])  # (B, T, d)
        if state is not None:
            state.shift_channel[self.layer] = x[:, -1]
        k = torch.relu(self.key(mix(x, shifted, self.time_mix_key))) ** 2  # (B, T, d_ff)   squared ReLU
        return torch.sigmoid(self.receptance(mix(x, shifted, self.time_mix_receptance))) * self.value(k)


class RWKVBlock(nn.Module):
    def __init__(self, cfg: RWKVConfig, layer: int):
        super().__init__()
        if layer == 0:
            self.pre_ln = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)  # LN₀ on the (small) embeddings
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps), nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attention, self.feed_forward = TimeMix(cfg, layer), ChannelMix(cfg, layer)

    def forward(self, x: torch.Tensor, state: RWKVState | None = None) -> torch.Tensor:
        if hasattr(self, "pre_ln"):
            x = self.pre_ln(x)
        x = x + self.attention(self.ln1(x), state)  # (B, T, d)
        return x + self.feed_forward(self.ln2(x), state)  # (B, T, d)


class RWKV(RecurrentLM):
    """An RWKV-4 language model: ``model(ids)`` for logits, ``model(ids, state)`` to continue a sequence."""

    config_type = RWKVConfig

    def __init__(self, cfg: RWKVConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.uniform_(self.embed.weight, -1e-4, 1e-4)  # the paper's small-init embedding, then LN₀
        self.blocks = nn.ModuleList(RWKVBlock(cfg, i) for i in range(cfg.n_layers))
        self.ln_out = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def new_state(self, batch_size: int) -> RWKVState:
        """An empty state for ``batch_size`` sequences, as before the first token."""
        w = self.embed.weight
        return RWKVState(self.cfg, batch_size, dtype=w.dtype, device=w.device)

    def forward(self, input_ids: torch.Tensor, state: RWKVState | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T); with a state, the ids continue what it summarises and the
        state is advanced past them."""
        self.check_ids(input_ids)
        if state is not None and state.batch_size != input_ids.shape[0]:
            raise ValueError(f"state.batch_size={state.batch_size} but input_ids has B={input_ids.shape[0]}; "
                             "create the state with model.new_state(B)")
        x = self.embed(input_ids)  # (B, T, d)
        for block in self.blocks:
            x = block(x, state)  # (B, T, d)
        if state is not None:
            state.length += input_ids.shape[1]
        return self.lm_head(self.ln_out(x))  # (B, T, vocab)

    @classmethod
    def from_hf(cls, hf_model: transformers.RwkvForCausalLM) -> RWKV:
        """Our model with the weights (dtype, device) of a transformers ``RwkvForCausalLM``.

        transformers halves the residual stream every ``rescale_every`` blocks in eval mode and divides two
        weights per block to match; the division is undone here, so the weights are the trained ones."""
        config = getattr(hf_model, "config", None)
        if getattr(config, "model_type", None) != "rwkv" or not hasattr(hf_model, "rwkv"):
            raise ValueError(f"hf_model must be a transformers RwkvForCausalLM, got {type(hf_model).__name__}")
        weight = hf_model.get_input_embeddings().weight
        model = cls(RWKVConfig.from_hf(config)).to(device=weight.device, dtype=weight.dtype)
        every = config.rescale_every if hf_model.rwkv.layers_are_rescaled else 0
        renames = {"rwkv.embeddings.": "embed.", "rwkv.blocks.": "blocks.", "rwkv.ln_out.": "ln_out.",
                   "head.": "lm_head."}
        state = {}
        for name, tensor in hf_model.state_dict().items():
            old = next((o for o in renames if name.startswith(o)), None)
            name = name if old is None else renames[old] + name[len(old):]
            if every > 0 and name.endswith(("attention.output.weight", "feed_forward.value.weight")):
                tensor = tensor * 2 ** (int(name.split(".")[1]) // every)  # undo the inference-time rescaling
            state[name] = tensor
        if model.cfg.tie_embeddings:
            state["lm_head.weight"] = state["embed.weight"]
        model.load_state_dict(state, strict=True)
        return model.eval()
