"""The one calling convention every efficient attention here follows, its checks, and a way into a model.

Every method is a function ``method(q, k, v, *, causal, **options) -> out`` on tensors shaped (B, H, T, D):
batch, heads, tokens, head dimension. Keys and values may have fewer heads than queries (H_kv dividing H,
grouped-query attention): query head h reads key/value head h // (H / H_kv). The exact reference they are
all measured against is softmax attention (Vaswani et al., 2017),

    out = softmax(Q Kᵀ / √D + M) V,        M_ij = −∞ where query i may not see key j (causal: j > i),

``softmax_attention`` below, which materialises the T × T score matrix on purpose: it is the quadratic
baseline the chapter times, where PyTorch's ``scaled_dot_product_attention`` is a fused kernel.

``AttentionSwap`` is our Llama's attention block with the inner product swapped for a method, same
projections and RoPE; ``use_attention`` puts it into every block of a model.
Glossary: B batch · H query heads · H_kv key/value heads · G = H / H_kv · T tokens · D head dimension.
Left out: KV caches (every method here runs a whole sequence at once) and dropout.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from effref.models.llama import Attention, KVCache, Llama, LlamaConfig, apply_rope, require_llama

Method = Callable[..., torch.Tensor]


def check_qkv(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor, causal: bool = False) -> int:
    """Check the shared calling convention; return G, the query heads per key/value head.

    ``k`` may be None only for methods that share queries and keys (Reformer). Causal attention needs as
    many keys as queries (self-attention: query i sees keys 0 … i).
    """
    named = {"q": q, "v": v} if k is None else {"q": q, "k": k, "v": v}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, H, T, D), got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}.shape={tuple(t.shape)} must be (B, H, T, D); add the missing axes with "
                             ".unsqueeze or reshape (B, T, H·D) inputs with .view(B, T, H, D).transpose(1, 2)")
        if not t.is_floating_point():
            raise TypeError(f"{name}.dtype={t.dtype} must be floating point; convert with .float()")
    if not isinstance(causal, bool):
        raise TypeError(f"causal={causal!r} must be True or False")
    kv = v if k is None else k
    if k is not None and k.shape != v.shape:
        raise ValueError(f"k.shape={tuple(k.shape)} and v.shape={tuple(v.shape)} must be equal")
    if k is not None and k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q and k have head dimensions {q.shape[-1]} and {k.shape[-1]}; they must be equal")
    if kv.shape[0] != q.shape[0]:
        raise ValueError(f"q has batch {q.shape[0]} but k/v have batch {kv.shape[0]}; they must be equal")
    H, H_kv = q.shape[1], kv.shape[1]
    if H_kv < 1 or H % H_kv:
        raise ValueError(f"q has {H} heads and k/v have {H_kv}: the key/value heads must divide the query "
                         f"heads (grouped-query attention); use n_kv_heads among the divisors of {H}")
    if causal and q.shape[2] != kv.shape[2]:
        raise ValueError(f"causal attention needs as many keys as queries, got {q.shape[2]} queries and "
                         f"{kv.shape[2]} keys; pass causal=False for cross-attention")
    return H // H_kv


def positive_int(name: str, value: object, fix: str) -> int:
    """``value`` as an int ≥ 1, or a ValueError that names the argument and the fix."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer ≥ 1; {fix}")
    return value


def expand_kv(t: torch.Tensor, group: int) -> torch.Tensor:
    """(B, H_kv, T, D) → (B, H_kv · G, T, D): each key/value head repeated for its G query heads."""
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def causal_mask(T: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, T) bool, True where query i may see key j (j ≤ i)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                      mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Exact attention with the (T_q, T_k) score matrix materialised; ``mask`` (True = may attend) is optional."""
    group = check_qkv(q, k, v, causal)
    k, v = expand_kv(k, group), expand_kv(v, group)  # (B, H, T_k, D)
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))  # (B,H,Tq,Tk)
    if causal:
        mask = causal_mask(q.shape[2], q.device) if mask is None else mask & causal_mask(q.shape[2], q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (B, H, T_q, D)


class AttentionSwap(Attention):
    """Our Llama's attention block (same projections, same RoPE) with ``method`` in place of softmax.

    ``shared_qk=True`` (Reformer) passes the rotated queries as keys too, and needs n_kv_heads = n_heads.
    """

    def __init__(self, cfg: LlamaConfig, layer: int, method: Method, shared_qk: bool = False, **options):
        super().__init__(cfg, layer)
        self.method, self.shared_qk, self.options = method, shared_qk, options

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        if cache is not None:
            raise ValueError("AttentionSwap runs whole sequences only; call the model without a KV cache")
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.d_head).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.d_head).transpose(1, 2)  # (B, H_kv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = self.method(q, q if self.shared_qk else k, v, causal=True, **self.options)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.d_head))  # (B, T, d_model)


def use_attention(model: Llama, method: Method, shared_qk: bool = False, **options) -> Llama:
    """Swap ``method(q, k, v, causal=True, **options)`` into every attention block of ``model``, in place.

    The weights are kept. The call is checked first on a small causal input, so a method that cannot be causal
    or a bad option raises before any block changes.
    """
    require_llama(model, "model")
    if not callable(method):
        raise TypeError(f"method must be an attention function (q, k, v, *, causal, ...), got {method!r}")
    cfg = model.cfg
    if shared_qk and cfg.n_kv_heads != cfg.n_heads:
        raise ValueError(f"shared_qk=True needs n_kv_heads == n_heads, got {cfg.n_kv_heads} and {cfg.n_heads}")
    probe = torch.randn(1, cfg.n_heads, 8, cfg.d_head)  # (1, H, 8, D)
    probe_kv = torch.randn(1, cfg.n_kv_heads, 8, cfg.d_head)  # (1, H_kv, 8, D)
    method(probe, probe if shared_qk else probe_kv, probe_kv, causal=True, **options)  # raises on bad input
    for block in model.blocks:
        old = block.attn
        new = AttentionSwap(cfg, old.layer, method, shared_qk, **options)
        new.load_state_dict(old.state_dict(), strict=True)
        block.attn = new.to(device=old.q_proj.weight.device, dtype=old.q_proj.weight.dtype)
    return model
