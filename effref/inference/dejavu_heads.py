"""Deja Vu for attention heads: per-token head importance, the sparse attention over the kept heads, its FLOPs.

Paper: Liu, Wang, Dao, Zhou, Yuan, Song, Shrivastava, Zhang, Tian, Ré, Chen (2023), "Deja Vu: Contextual
Sparsity for Efficient LLMs at Inference Time", arXiv:2310.17157 — §3 (contextual sparsity of heads), §4.2
(the sparsified attention block).
Implements: attention is a sum over heads,  o = Σ_h W_O[:, h] y_h  (W_O[:, h] the d_head columns of o_proj that
read head h), so head h's importance for token t is the norm of its contribution,  c_h(t) = ‖W_O[:, h] y_h(t)‖:
Deja Vu skips the heads whose output for a token is small; measuring it after o_proj also counts a head as
small when o_proj shrinks its output. The sparse attention computes only the k kept query heads; with grouped
keys and values (GQA) a key/value head is computed when any of the query heads that read it is kept. The
predictor, the top-k choice and the model-level switch are shared with the MLP (``dejavu_predictor``,
``dejavu.sparsified(..., part="attn")``).
Glossary: d ``d_model`` · y_h head h's output (d_head) · W_O ``o_proj.weight`` · c_h head importance · k query
          heads kept per token · g key/value heads they need (``kv_heads_needed``) · n context length.
Left out: sparse heads with a KV cache (a skipped key/value head leaves a hole that later tokens would read; the
          paper keeps the cache); the fused gather kernels that turn the FLOP saving into wall-clock time. The
          model-level evaluation multiplies head outputs by a 0/1 mask, which gives the numbers of the gathered
          computation (``sparse_attention``, tested equal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effref.inference.dejavu_predictor import SparsePart, SparsityPredictor, predictor_flops
from effref.models.llama import Attention, KVCache, apply_rope


def _project_heads(proj: torch.nn.Linear, x: torch.Tensor, idx: torch.Tensor, d_head: int) -> torch.Tensor:
    """proj(x) for heads ``idx`` only: their d_head rows of the weight and of the bias, if any (Qwen2)."""
    weight = proj.weight.unflatten(0, (-1, d_head))[idx].flatten(0, 1)  # (len(idx) · d_head, d)
    bias = None if proj.bias is None else proj.bias.view(-1, d_head)[idx].flatten()  # (len(idx) · d_head,)
    return F.linear(x, weight, bias)  # (B, T, len(idx) · d_head)


def head_outputs(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 heads: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention outputs y_h of query heads ``heads`` (default all) for x (B, T, d): (B, T, k, d_head).

    Only the kept query heads and the key/value heads they read are projected (all heads: the very products
    of ``Attention.forward``, so the result is bit-identical to it).
    """
    B, T, _ = x.shape
    groups = attn.n_heads // attn.n_kv_heads  # query head h reads key/value head h // groups
    if heads is None:
        q, k, v, kv_of_head = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), torch.arange(attn.n_heads, device=x.device) // groups
    else:
        kv, kv_of_head = torch.unique(heads // groups, return_inverse=True)  # needed kv heads; one per query head
        q = _project_heads(attn.q_proj, x, heads, attn.d_head)  # (B, T, k · d_head)
        k, v = (_project_heads(p, x, kv, attn.d_head) for p in (attn.k_proj, attn.v_proj))  # (B, T, g · d_head)
    q, k, v = (t.view(B, T, -1, attn.d_head).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d_head)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k[:, kv_of_head], v[:, kv_of_head]  # (B, k, T, d_head): the kv head each kept query head reads
    return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1).transpose(1, 2)  # (B, T, k, d_head)


def head_contributions(attn: Attention, y: torch.Tensor) -> torch.Tensor:
    """W_O[:, h] y_h for every head's output y (B, T, n_heads, d_head): (B, T, n_heads, d); their sum is o."""
    w_o = attn.o_proj.weight.view(-1, attn.n_heads, attn.d_head)  # (d, n_heads, d_head)
    return torch.einsum("bthe,dhe->bthd", y, w_o)


def head_importance(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """c_h(t) = ‖W_O[:, h] y_h(t)‖, the norm of head h's contribution to token t's output: (B, T, n_heads)."""
    return head_contributions(attn, head_outputs(attn, x, cos, sin)).norm(dim=-1)


def sparse_attention(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     heads: torch.Tensor) -> torch.Tensor:
    """The attention computing only query heads ``heads`` (k,) for x (B, T, d), one set for the whole input
    (a decoding batch shares it): the k query heads' rows of W_Q and columns of W_O, the needed kv heads' rows
    of W_K and W_V; see ``attention_flops``."""
    if x.ndim != 3 or heads.ndim != 1 or not 1 <= len(heads) <= attn.n_heads or len(set(heads.tolist())) != \
            len(heads) or not 0 <= int(heads.min()) <= int(heads.max()) < attn.n_heads:
        raise ValueError(f"x {tuple(x.shape)} must be (B, T, d) and heads {heads.tolist()} distinct query "
                         f"heads in [0, {attn.n_heads})")
    w_o = attn.o_proj.weight.view(-1, attn.n_heads, attn.d_head)[:, heads].flatten(1)  # (d, k · d_head)
    return F.linear(head_outputs(attn, x, cos, sin, heads).flatten(2), w_o)  # (B, T, d)


def kv_heads_needed(mask: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """How many key/value heads a 0/1 query-head mask (..., n_heads) needs: one per group with a kept head."""
    return mask.unflatten(-1, (n_kv_heads, -1)).amax(-1).sum(-1)  # (...,)


def attention_flops(d_model: int, d_head: int, n_heads: int, n_kv_heads: int, k: float, kv_needed: float,
                    context: int, rank: int = 0) -> dict[str, float]:
    """FLOPs per token of attention over ``context`` keys: dense, with k query heads and ``kv_needed`` kv heads
    (means over tokens may be fractional), and the rank-r head predictor. Per query head: W_Q and W_O
    (2 · 2 · d · d_head) and q·K, p·V (2 · 2 · context · d_head); per kv head: W_K and W_V (2 · 2 · d · d_head)."""
    def cost(heads: float, kv: float) -> float:
        return heads * 4 * d_head * (d_model + context) + kv * 4 * d_model * d_head
    return {"dense": cost(n_heads, n_kv_heads), "sparse": cost(k, kv_needed),
            "predictor": predictor_flops(d_model, n_heads, rank)}


class SparseAttention(SparsePart):
    """A block's attention restricted to k query heads per token; every head computed, outputs masked 0/1."""

    def __init__(self, attn: Attention, k: int, selector: str, predictor: SparsityPredictor | None = None,
                 generator: torch.Generator | None = None):
        super().__init__(k, selector, predictor, generator)
        self.attn = attn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        if cache is not None:
            raise ValueError("sparse attention heads run without a KV cache (a skipped kv head would leave a "
                             "hole that later tokens read); call the model without a cache")
        y = head_outputs(self.attn, x, cos, sin)  # (B, T, n_heads, d_head)
        mask = self.mask(x, self.attn.n_heads, lambda: head_contributions(self.attn, y).norm(dim=-1))
        return self.attn.o_proj((y * mask[..., None]).flatten(2))  # (B, T, d)
