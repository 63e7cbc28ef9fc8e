"""LLaMA from scratch: the decoder every later chapter takes apart.

Papers: Touvron et al. (2023), "LLaMA: Open and Efficient Foundation Language Models", arXiv:2302.13971
(§2.2); Su et al. (2021), "RoFormer", arXiv:2104.09864 (RoPE, Eq. 34); Zhang & Sennrich (2019),
arXiv:1910.07467 (RMSNorm, Eq. 4); Shazeer (2020), arXiv:2002.05202 (SwiGLU and GeGLU, FFN_SwiGLU in §2);
Ainslie et al. (2023), arXiv:2305.13245 (grouped-query attention); Gemma Team (2024), arXiv:2403.08295
(§2, the architecture).
Implements: a pre-norm decoder  h = x + Attn(RMSNorm(x)),  out = h + MLP(RMSNorm(h)),  with
  RMSNorm(x) = g ⊙ x / sqrt(mean(x²) + ε),
  RoPE on queries and keys in the "rotate half" layout of Hugging Face LLaMA (so its weights load unpermuted),
  attention softmax(q kᵀ / sqrt(d_head) + causal mask) v with n_kv_heads ≤ n_heads (each group of
  n_heads / n_kv_heads query heads shares one key/value head),
  gated MLP  down(act(gate(x)) ⊙ up(x)),  act = silu (SwiGLU) or tanh-approximated gelu (GeGLU),
an explicit KV cache, greedy / temperature / top-k generation, and loading from transformers (``from_hf``),
including checkpoints whose RoPE is scaled (linear, dynamic NTK, YaRN, Llama 3): ``RopeScaling`` and
``scaled_inv_freq`` below change the angle of each pair (effref/longcontext/rope_scaling.py explains them).
The families ``from_hf`` loads differ from LLaMA only by a few config fields:
  Mistral  a sliding window (exact up to the window, which becomes max_seq_len);
  Qwen2    biases on the q/k/v projections (``qkv_bias``);
  Gemma    embeddings times sqrt(d_model) (``embed_scale``), GeGLU (``activation``), d_head decoupled from
           d_model / n_heads (``head_dim``), tied embeddings, and RMSNorm gain (1 + w), folded into g = 1 + w
           at load time (exact in fp32; in bf16 g is rounded to bf16 and multiplies the bf16-rounded x̂, where
           transformers multiplies in fp32 and rounds once, so bf16 logits agree to rounding only).
OPT, GPT-2 (learned positions, LayerNorm, ungated MLPs) and Gemma 2/3 (soft-capping, local/global layers,
extra norms) are refused by name with what differs.
Glossary: B batch · T new tokens in this call · S keys attended to (cached + new) · d_model hidden size
          · n_heads / n_kv_heads query / key-value heads · d_head = head_dim or d_model / n_heads · d_ff MLP
          width · θ rope_theta · ε norm_eps · offset = cache.length, the position of the first new token.
Left out: padding masks (batches hold equal-length prompts), LongRoPE's per-pair factors and DeepSeek's
          YaRN mscale, a dynamic-NTK scale recomputed at every length (the tables serve max_seq_len), biases on
          o_proj and on the MLP, sliding-window attention past the window (effref/longcontext/sliding_window.py),
          dropout, tensor parallelism; fused kernels live in kernels/.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from effref.checks import token_ids_or_raise

if TYPE_CHECKING:
    import transformers


# the gated MLP's activation: SwiGLU (LLaMA, Mistral, Qwen2) or GeGLU with tanh-approximated gelu (Gemma)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh")}


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    d_ff: int = 11008
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    bos_id: int | None = None
    eos_id: int | None = None
    head_dim: int | None = None  # None: d_model / n_heads (Gemma sets its own)
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    activation: str = "silu"  # of the gated MLP, a key of ACTIVATIONS ("gelu_pytorch_tanh": Gemma)
    embed_scale: float = 1.0  # token embeddings are multiplied by it (Gemma: sqrt(d_model))
    rope_scaling: RopeScaling = field(default_factory=lambda: RopeScaling())  # kind "none": plain RoPE

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                             f"pick n_heads among the divisors of {self.d_model}, or set head_dim")
        if self.head_dim is not None and self.head_dim < 1:
            raise ValueError(f"head_dim={self.head_dim} must be a positive integer (None: d_model / n_heads)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                             f"each key/value head must serve a whole group of query heads")
        if self.d_head % 2:
            raise ValueError(f"d_head={self.d_head} (head_dim, or d_model / n_heads) is odd; RoPE rotates "
                             "pairs of dimensions, so choose sizes that give an even d_head")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not known; use one of {sorted(ACTIVATIONS)}")
        if not self.embed_scale > 0:
            raise ValueError(f"embed_scale={self.embed_scale} must be positive (1.0: embeddings as stored)")
        if not isinstance(self.rope_scaling, RopeScaling):
            raise TypeError(f"rope_scaling must be a RopeScaling, got {type(self.rope_scaling).__name__}; e.g. "
                            "RopeScaling('linear', factor=2.0)")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @classmethod
    def from_hf(cls, hf_config: transformers.PretrainedConfig) -> LlamaConfig:
        """Read the config of a transformers LLaMA, Mistral, Qwen2 or Gemma (v4: a ``rope_theta`` attribute and
        ``rope_scaling``; v5: ``rope_parameters``), its RoPE scaling included; other families are refused with
        what differs."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in LLAMA_SHAPED:
            raise ValueError(family_refusal(model_type, type(hf_config).__name__))
        rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
        rope = dict(rope or {})
        scaling = scaling_from_hf(hf_config)
        unsupported = {"attention_bias": "biases on q, k, v and o (only Qwen2's q/k/v biases exist here)",
                       "mlp_bias": "biases in the MLP", "use_bidirectional_attention": "non-causal attention"}
        for name, what in unsupported.items():
            if getattr(hf_config, name, False):
                raise ValueError(f"hf_config.{name}={getattr(hf_config, name)!r} is not supported: {what}; "
                                 "use a model without them")
        activation = getattr(hf_config, "hidden_activation", None) or getattr(hf_config, "hidden_act", "silu")
        if activation not in ACTIVATIONS:
            raise ValueError(f"hf_config.hidden_act={activation!r} is not supported; the gated MLP "
                             f"implements {sorted(ACTIVATIONS)}")
        d_model, n_heads = hf_config.hidden_size, hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or d_model // n_heads
        window = getattr(hf_config, "sliding_window", None)
        if model_type == "qwen2" and not getattr(hf_config, "use_sliding_window", False):
            window = None  # Qwen2 slides only when asked to (and then only in its upper layers)
        max_seq_len = hf_config.max_position_embeddings
        if window is not None and window < max_seq_len:
            max_seq_len = window  # up to `window` tokens, sliding-window attention is full causal attention
        eos = hf_config.eos_token_id
        return cls(vocab_size=hf_config.vocab_size, d_model=d_model, n_layers=hf_config.num_hidden_layers,
                   n_heads=n_heads, n_kv_heads=hf_config.num_key_value_heads or n_heads,
                   d_ff=hf_config.intermediate_size,
                   rope_theta=float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
                   norm_eps=hf_config.rms_norm_eps, max_seq_len=max_seq_len,
                   tie_embeddings=bool(hf_config.tie_word_embeddings), bos_id=hf_config.bos_token_id,
                   eos_id=eos[0] if isinstance(eos, (list, tuple)) else eos,  # several EOS ids: the first
                   head_dim=None if head_dim * n_heads == d_model else head_dim,
                   qkv_bias=model_type == "qwen2", activation=activation,
                   embed_scale=d_model**0.5 if model_type == "gemma" else 1.0, rope_scaling=scaling)


LLAMA_SHAPED = ("llama", "mistral", "qwen2", "gemma")  # model types whose weights and forward are LLaMA's
_SUGGESTION = ("use a LLaMA-shaped model such as SmolLM2, Llama, Mistral, Qwen2 or Gemma (1), or run this "
               "one through transformers (the compression techniques take it; the inference techniques need "
               "effref's Llama)")
_GEMMA2 = ("tanh soft-capping of the attention and final logits, layers alternating sliding-window and "
           "global attention, extra norms after attention and MLP, a query scale from query_pre_attn_scalar")
_GEMMA3 = _GEMMA2 + ", plus RMSNorm on queries and keys and a second RoPE base for the local layers"
# model types from_hf refuses, with what differs from the LLaMA block
NOT_LLAMA_SHAPED = {
    "opt": "learned absolute position embeddings instead of RoPE, LayerNorm with bias instead of RMSNorm, "
           "an ungated ReLU MLP (fc1, fc2) and biases on every projection",
    "gpt2": "learned absolute position embeddings instead of RoPE, LayerNorm with bias instead of RMSNorm, "
            "an ungated GELU MLP (c_fc, c_proj) and one fused q/k/v projection (c_attn) with biases",
    "gemma2": _GEMMA2, "gemma3": _GEMMA3, "gemma3_text": _GEMMA3,
}


def family_refusal(model_type: str | None, name: str) -> str:
    """Why ``Llama.from_hf`` cannot convert a ``model_type`` model (``name``: its class), and what to do."""
    known = ", ".join(LLAMA_SHAPED)
    if model_type in NOT_LLAMA_SHAPED:
        return (f"{name} (model_type {model_type!r}) is not LLaMA-shaped: {NOT_LLAMA_SHAPED[model_type]}. "
                f"Llama.from_hf converts {known} only; {_SUGGESTION}")
    return (f"{name} (model_type {model_type!r}) is not a family Llama.from_hf knows ({known}); "
            f"{_SUGGESTION}. A family whose block is exactly LLaMA's (RoPE, RMSNorm, gated MLP) can be added "
            "to LLAMA_SHAPED with a test against transformers' logits")


class KVCache:
    """Keys and values of every layer, preallocated as (B, n_kv_heads, max_len, d_head) per layer.

    Protocol (one forward call with T new tokens): the model reads ``length`` (the position of the first new
    token), each attention layer calls ``update(layer, k, v)``, which stores the new keys/values after the old
    ones and returns everything that layer should attend to, and the model finally calls ``advance(T)``.
    Preallocating avoids the O(length) copy that growing by ``torch.cat`` pays on every decoding step.
    A subclass may change what ``update`` returns (an eviction policy drops columns), as long as the T new
    keys come last, in order: the causal mask is built from that rule, not from ``length``.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, d_head: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (batch_size, n_kv_heads, max_len, d_head)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.batch_size, self.max_len = batch_size, max_len
        self.length = 0  # tokens already stored = position of the next token

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {start} cached + {k.shape[2]} new tokens > max_len="
                             f"{self.max_len}; create the cache with a larger max_len")
        self.k[layer][:, :, start:end] = k  # (B, n_kv_heads, T, d_head) written in place
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, n_kv_heads, S, d_head) views

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget every token from position ``length`` on (speculative decoding drops rejected drafts)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"length={length} must lie in [0, {self.length}] (the tokens currently cached)")
        self.length = length

    def reset(self) -> None:
        self.length = 0


class ScaledEmbedding(nn.Embedding):
    """Token embeddings times a constant (Gemma: sqrt(d_model)), the constant first rounded to the weight
    dtype as transformers does (in bf16, sqrt(3072) = 55.43 becomes 55.5)."""

    def __init__(self, vocab_size: int, dim: int, scale: float):
        super().__init__(vocab_size, dim)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = super().forward(input_ids)  # (B, T, d_model)
        return x * torch.tensor(self.scale).to(x.dtype)  # fp32 constant -> model dtype, like transformers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # the mean of squares in fp32 even for a bf16 model
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # Eq. 4: x / RMS(x)
        return self.weight * x32.to(x.dtype)


ROPE_KINDS = ("none", "linear", "ntk", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """How to stretch RoPE from ``original_len`` trained positions by ``factor`` (kind: one of ``ROPE_KINDS``;
    the methods are explained in effref/longcontext/rope_scaling.py)."""

    kind: str = "none"
    factor: float = 1.0  # s = target length / trained length
    original_len: int | None = None  # L; needed by dynamic, yarn and llama3
    beta_fast: float = 32.0  # yarn: pairs turning more than this over L keep θ_i
    beta_slow: float = 1.0  # yarn: pairs turning less than this over L are interpolated
    attention_factor: float | None = None  # yarn: None = 0.1 ln s + 1
    truncate: bool = True  # yarn: round the ramp's ends outwards to whole pairs, as the released code
    low_freq_factor: float = 1.0  # llama3: wavelengths above L / low_freq_factor are interpolated
    high_freq_factor: float = 4.0  # llama3: wavelengths below L / high_freq_factor keep θ_i

    def __post_init__(self) -> None:
        if self.kind not in ROPE_KINDS:
            raise ValueError(f"kind={self.kind!r} is not known; use one of {ROPE_KINDS} (linear = position "
                             "interpolation)")
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) or not self.factor >= 1:
            raise ValueError(f"factor={self.factor!r} must be a number >= 1: the target context divided by the "
                             "trained one (e.g. 4.0 to run a 2048-token model at 8192); < 1 would shrink it")
        if self.kind in ("dynamic", "yarn", "llama3") and self.original_len is None:
            raise ValueError(f"kind={self.kind!r} needs original_len, the context length the model was trained "
                             "with (e.g. original_len=2048)")
        if self.original_len is not None and (isinstance(self.original_len, bool) or
                                               not isinstance(self.original_len, int) or self.original_len < 1):
            raise ValueError(f"original_len={self.original_len!r} must be a positive integer: the context "
                             "length the model was trained with")
        if not 0 < self.beta_slow < self.beta_fast:
            raise ValueError(f"beta_slow={self.beta_slow}, beta_fast={self.beta_fast}: need 0 < beta_slow < "
                             "beta_fast (the paper's 1 and 32)")
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ValueError(f"attention_factor={self.attention_factor!r} must be positive, or None for "
                             "0.1 ln(factor) + 1")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"low_freq_factor={self.low_freq_factor}, high_freq_factor={self.high_freq_factor}: "
                             "need 0 < low_freq_factor < high_freq_factor (Llama 3.1: 1 and 4)")


def _check_rope(d_head: int, theta: float) -> None:
    if isinstance(d_head, bool) or not isinstance(d_head, int) or d_head < 4 or d_head % 2:
        raise ValueError(f"d_head={d_head!r} must be an even integer >= 4 (RoPE turns pairs; NTK's exponent "
                         "d/(d−2) needs d > 2)")
    if not (isinstance(theta, (int, float)) and math.isfinite(theta) and theta > 1):
        raise ValueError(f"theta={theta!r} must be a finite RoPE base > 1, e.g. 10000.0")


def rope_inv_freq(d_head: int, theta: float) -> torch.Tensor:
    """θ_i = θ^(−2i/d) for the d/2 pairs, (d_head/2,): the angle per position of each pair."""
    _check_rope(d_head, theta)
    return 1.0 / theta ** (torch.arange(0, d_head, 2, dtype=torch.int64).float() / d_head)  # (d_head/2,)


def ntk_theta(theta: float, d_head: int, factor: float) -> float:
    """NTK-aware base θ' = θ · s^(d/(d−2)), which divides the slowest pair's θ_i by exactly s."""
    return theta * factor ** (d_head / (d_head - 2))


def dynamic_factor(factor: float, original_len: int, seq_len: int) -> float:
    """Dynamic NTK's scale for the current length T: s · max(T, L)/L − (s − 1), = 1 while T ≤ L."""
    return factor * max(seq_len, original_len) / original_len - (factor - 1)


def yarn_attention_factor(factor: float) -> float:
    """YaRN's temperature (§3.4): √(1/t) = 0.1 ln s + 1, the factor on cos and sin (1 when s ≤ 1)."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def yarn_keep(d_head: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """γ_i (d_head/2,): 1 where pair i keeps θ_i (extrapolates), 0 where it takes θ_i / s (interpolates)."""
    _check_rope(d_head, theta)
    L = scaling.original_len

    def pair_with_turns(turns: float) -> float:  # solve L / λ_i = turns for i, with λ_i = 2π θ^(2i/d)
        return d_head * math.log(L / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_with_turns(scaling.beta_fast), pair_with_turns(scaling.beta_slow)  # low < high
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d_head - 1)
    if low == high:
        high += 0.001  # a one-pair ramp
    ramp = ((torch.arange(d_head // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # 0 → 1 with i
    return 1 - ramp  # (d_head/2,)


def llama3_keep(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1's share γ_i (d_head/2,) kept from θ_i: 1 for wavelengths λ_i < L / high_freq_factor, 0 above
    L / low_freq_factor, and between them linear in the turns over L: γ = (L/λ − low) / (high − low)."""
    turns = scaling.original_len * inv_freq / (2 * math.pi)  # L / λ_i
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    return ((turns - low) / (high - low)).clamp(0, 1)  # (d_head/2,)


def scaled_inv_freq(d_head: int, theta: float, scaling: RopeScaling,
                    seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """The inverse frequencies (d_head/2,) and the factor on cos/sin of ``scaling``; ``seq_len`` (the length of
    the sequence the tables serve) matters for ``dynamic`` only (None: original_len, i.e. unscaled)."""
    base = rope_inv_freq(d_head, theta)  # (d_head/2,)
    s = float(scaling.factor)
    if scaling.kind == "none":
        return base, 1.0
    if scaling.kind == "linear":
        return base / s, 1.0  # PI: f(x, m / s) turns pair i by (m / s) θ_i
    if scaling.kind == "ntk":
        return rope_inv_freq(d_head, ntk_theta(theta, d_head, s)), 1.0
    if scaling.kind == "dynamic":
        length = scaling.original_len if seq_len is None else seq_len
        s_now = dynamic_factor(s, scaling.original_len, length)
        return rope_inv_freq(d_head, ntk_theta(theta, d_head, s_now)), 1.0
    if scaling.kind == "llama3":
        keep = llama3_keep(base, scaling)
        return base / s * (1 - keep) + base * keep, 1.0
    keep = yarn_keep(d_head, theta, scaling)  # kind == "yarn"
    inv_freq = base / s * (1 - keep) + base * keep  # h(θ_i) = (1 − γ_i) θ_i / s + γ_i θ_i
    mscale = yarn_attention_factor(s) if scaling.attention_factor is None else float(scaling.attention_factor)
    return inv_freq, mscale


def scaling_from_hf(hf_config: transformers.PretrainedConfig) -> RopeScaling:
    """The ``RopeScaling`` of a transformers config (``rope_parameters``, or v4's ``rope_scaling``)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return RopeScaling()
    if kind not in ("linear", "dynamic", "yarn", "llama3") or params.get("mscale") or params.get("mscale_all_dim"):
        raise ValueError(f"rope_type {kind!r} with {sorted(params)} is not implemented here; Llama.from_hf reads "
                         "the default RoPE and linear, dynamic, yarn (without DeepSeek's mscale) and llama3")
    factor = float(params["factor"])
    if kind == "linear":
        return RopeScaling("linear", factor)
    if kind == "dynamic":
        return RopeScaling("dynamic", factor, original_len=hf_config.max_position_embeddings)
    original_len = int(params["original_max_position_embeddings"])
    if kind == "llama3":
        return RopeScaling("llama3", factor, original_len=original_len,
                           low_freq_factor=float(params["low_freq_factor"]),
                           high_freq_factor=float(params["high_freq_factor"]))
    return RopeScaling("yarn", factor, original_len=original_len, beta_fast=float(params.get("beta_fast") or 32),
                       beta_slow=float(params.get("beta_slow") or 1), attention_factor=params.get("attention_factor"),
                       truncate=params.get("truncate", True))


def rope_tables(d_head: int, max_len: int, theta: float,
                scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of angle m·θ_i for positions m < max_len, each (max_len, d_head): θ_i = θ^(-2i/d_head), or
    as ``scaling`` changes it (its attention factor folded into both; ``dynamic`` is built for max_len).

    The frequency of pair i is repeated in columns i and i + d_head/2: HF LLaMA rotates dimension i with
    dimension i + d_head/2 ("rotate half") rather than the paper's adjacent pairs (2i, 2i+1).
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len={max_len!r} must be a positive integer: the longest input, in tokens")
    inv_freq, mscale = scaled_inv_freq(d_head, theta, scaling or RopeScaling(), seq_len=max_len)  # (d_head/2,)
    angles = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (max_len, d_head/2)
    angles = torch.cat([angles, angles], dim=-1)  # (max_len, d_head)
    return angles.cos() * mscale, angles.sin() * mscale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, d_head) by the angles of its positions; cos, sin are (T, d_head)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, heads, T, d_head/2) each
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, heads, T, d_head)
    return x * cos + rotated * sin  # RoFormer Eq. 34, pairs (i, i + d_head/2)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads = layer, cfg.n_heads, cfg.n_kv_heads
        self.d_head = cfg.d_head
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.d_head, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.d_head, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.d_head, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.d_head, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, n_heads, T, d_head)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.d_head).transpose(1, 2)  # (B, n_kv, T, d_head)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.d_head).transpose(1, 2)  # (B, n_kv, T, d_head)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, n_kv, S, d_head)
        S = k.shape[2]
        groups = self.n_heads // self.n_kv_heads  # query head h reads key/value head h // groups
        k = k.repeat_interleave(groups, dim=1)  # (B, n_heads, S, d_head)
        v = v.repeat_interleave(groups, dim=1)  # (B, n_heads, S, d_head)
        if T == S or T == 1:  # plain causal prefill, or one new token that may see everything
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # (B, n_heads, T, d_head)
        else:  # new tokens are the last T of S keys: query i sees keys 0 .. S - T + i
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)  # (T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, n_heads, T, d_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.d_head))  # (B, T, d_model)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))  # (B, T, d_ff) inside; (B, T, d_model)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.d_model, cfg.norm_eps), Attention(cfg, layer)
        self.mlp_norm, self.mlp = RMSNorm(cfg.d_model, cfg.norm_eps), MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)  # (B, T, d_model)
        return x + self.mlp(self.mlp_norm(x))  # (B, T, d_model)


# transformers' parameter names, one dotted component at a time -> ours (q/k/v/o_proj and lm_head agree).
_HF_NAMES = {"embed_tokens": "embed", "layers": "blocks", "self_attn": "attn", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "mlp_norm", "gate_proj": "gate", "up_proj": "up",
             "down_proj": "down"}


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = (nn.Embedding(cfg.vocab_size, cfg.d_model) if cfg.embed_scale == 1.0
                      else ScaledEmbedding(cfg.vocab_size, cfg.d_model, cfg.embed_scale))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.d_head, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, d_head)
        self.register_buffer("rope_sin", sin, persistent=False)  # (max_seq_len, d_head)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def num_parameters(self) -> int:
        """Number of distinct parameters (tied embeddings counted once)."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_len`` tokens (default: max_seq_len).

        The memory is taken at once: 2 · n_layers · batch_size · n_kv_heads · max_len · d_head numbers
        (SmolLM2-135M in fp32: 45 KiB per token, 360 MiB for all 8192 positions), so pass the ``max_len``
        you need.
        """
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        if batch_size < 1 or not 1 <= max_len <= self.cfg.max_seq_len:
            raise ValueError(f"batch_size={batch_size}, max_len={max_len}: need batch_size >= 1 and "
                             f"1 <= max_len <= max_seq_len={self.cfg.max_seq_len}")
        w = self.embed.weight
        return KVCache(self.cfg.n_layers, batch_size, self.cfg.n_kv_heads, self.cfg.d_head, max_len,
                       dtype=w.dtype, device=w.device)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T); with a cache, the ids continue the cached sequence."""
        token_ids_or_raise(input_ids, self.cfg.vocab_size)
        B, T = input_ids.shape
        offset = 0 if cache is None else cache.length
        if offset + T > self.cfg.max_seq_len:
            raise ValueError(f"{offset} cached + {T} new tokens exceed max_seq_len={self.cfg.max_seq_len}; "
                             "shorten the input or reset the cache")
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"cache.batch_size={cache.batch_size} but input_ids has B={B}; "
                             "create the cache with model.new_cache(B)")
        cos, sin = self.rope_cos[offset:offset + T], self.rope_sin[offset:offset + T]  # (T, d_head) each
        x = self.embed(input_ids)  # (B, T, d_model)
        for block in self.blocks:
            x = block(x, cos, sin, cache)  # (B, T, d_model)
        if cache is not None:
            cache.advance(T)
        return self.lm_head(self.norm(x))  # (B, T, vocab)

    @torch.no_grad()
    def generate_stream(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                        top_k: int | None = None, eos_id: int | None = None,
                        generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token of every sequence, (B,), one step at a time: one prefill, then cached steps.

        Greedy when ``temperature == 0``; otherwise sample softmax(logits / temperature), restricted to the
        ``top_k`` most likely tokens when given. Sequences that emitted ``eos_id`` keep emitting it, and the
        stream stops once all of them have.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}; use ids[None]")
        if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"max_new_tokens={max_new_tokens}, temperature={temperature}, top_k={top_k}: "
                             "need max_new_tokens >= 0, temperature >= 0 and top_k >= 1 (or None)")
        total = input_ids.shape[1] + max_new_tokens
        if total > self.cfg.max_seq_len:
            raise ValueError(f"prompt {input_ids.shape[1]} + max_new_tokens={max_new_tokens} tokens exceed "
                             f"max_seq_len={self.cfg.max_seq_len}; ask for fewer new tokens")
        if max_new_tokens == 0:
            return
        cache = self.new_cache(input_ids.shape[0], max_len=total)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # (B,)
        logits = self(input_ids, cache)[:, -1]  # prefill, (B, vocab)
        for step in range(max_new_tokens):
            if temperature == 0:
                token = logits.argmax(dim=-1)  # (B,)
            else:
                logits = logits.float() / temperature  # (B, vocab)
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]  # (B,)
            if eos_id is not None:
                token = token.masked_fill(done, eos_id)
                done |= token == eos_id
            yield token
            if step + 1 == max_new_tokens or bool(done.all()):
                return
            logits = self(token[:, None], cache)[:, -1]  # (B, vocab)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, eos_id: int | None = None,
                 generator: torch.Generator | None = None,
                 stream: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """The prompt followed by up to ``max_new_tokens`` tokens, (B, T + new); see ``generate_stream``.

        ``stream`` (optional) is called with each new (B,) token as soon as it exists.
        """
        new = []
        for token in self.generate_stream(input_ids, max_new_tokens, temperature, top_k, eos_id, generator):
            if stream is not None:
                stream(token)
            new.append(token[:, None])  # (B, 1)
        return torch.cat([input_ids, *new], dim=1)  # (B, T + new)

    @classmethod
    def from_hf(cls, hf_model: transformers.PreTrainedModel) -> Llama:
        """Our model with the weights (and dtype, device) of a transformers causal LM of a LLaMA-shaped family
        (``LLAMA_SHAPED``: LLaMA, Mistral, Qwen2, Gemma); any other is refused with what differs."""
        model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
        if model_type is None or not hasattr(hf_model, "lm_head"):
            raise ValueError(f"hf_model must be a transformers causal LM of LLaMA's shape "
                             f"({', '.join(LLAMA_SHAPED)}), got {type(hf_model).__name__}; load one with "
                             "AutoModelForCausalLM.from_pretrained")
        if model_type not in LLAMA_SHAPED:
            raise ValueError(family_refusal(model_type, type(hf_model).__name__))
        cfg = LlamaConfig.from_hf(hf_model.config)
        weight = hf_model.get_input_embeddings().weight
        model = cls(cfg).to(device=weight.device, dtype=weight.dtype)
        state = {".".join(_HF_NAMES.get(part, part) for part in name.split(".") if part != "model"): tensor
                 for name, tensor in hf_model.state_dict().items()}
        if model_type == "gemma":  # Gemma's RMSNorm scales by (1 + w): fold the 1 in, in fp32
            state = {name: (1.0 + t.float()).to(t.dtype) if name.endswith("norm.weight") else t
                     for name, t in state.items()}
        if cfg.tie_embeddings:
            state.pop("lm_head.weight", None)  # shared with embed.weight, which is loaded
            state["lm_head.weight"] = state["embed.weight"]
        model.load_state_dict(state, strict=True)
        return model.eval()


def require_llama(model: object, name: str = "model") -> None:
    """The inference techniques run on our :class:`Llama` (or a model that speaks its decoding protocol:
    ``cfg`` and ``new_cache``, called as ``model(ids, cache)``); refuse anything else with the conversion to
    use, or, for a transformers family ``Llama.from_hf`` cannot convert, with what differs."""
    if isinstance(model, Llama) or (hasattr(model, "cfg") and callable(getattr(model, "new_cache", None))):
        return
    raise TypeError(not_llama_message(model, name))


def not_llama_message(model: object, name: str = "model") -> str:
    """The error for a ``name`` that is not effref's Llama: the conversion, or why there is none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    got = f"{name} must be effref's Llama, got {type(model).__name__}"
    if model_type is not None and model_type not in LLAMA_SHAPED:
        return f"{got}, and Llama.from_hf cannot convert it: " + family_refusal(model_type, type(model).__name__)
    return (f"{got}; convert a transformers model of a LLaMA-shaped family ({', '.join(LLAMA_SHAPED)}) with "
            f"effref.models.llama.Llama.from_hf({name})")
