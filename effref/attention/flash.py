"""FlashAttention-2's forward pass, tile by tile in plain PyTorch: exact attention without the T × T matrix.

Papers: Dao, Fu, Ermon, Rudra, Ré (2022), arXiv:2205.14135, Algorithm 1; Dao (2023), arXiv:2307.08691,
Algorithm 1 (FlashAttention-2: the loop over query tiles is the outer one, the output is rescaled once at
the end, and causal tiles above the diagonal are skipped).

For one tile of B_r queries, walk the key/value tiles j = 1 … T_c and keep three running quantities per row:
the largest score so far m, the sum of exponentials ℓ under that maximum, and the unnormalised output O,

    S⁽ʲ⁾ = Q_i K_jᵀ / √D,                 m⁽ʲ⁾ = max(m⁽ʲ⁻¹⁾, rowmax S⁽ʲ⁾),
    P̃⁽ʲ⁾ = exp(S⁽ʲ⁾ − m⁽ʲ⁾),              ℓ⁽ʲ⁾ = e^{m⁽ʲ⁻¹⁾ − m⁽ʲ⁾} ℓ⁽ʲ⁻¹⁾ + rowsum P̃⁽ʲ⁾,
    O⁽ʲ⁾ = e^{m⁽ʲ⁻¹⁾ − m⁽ʲ⁾} O⁽ʲ⁻¹⁾ + P̃⁽ʲ⁾ V_j,   and at the end  O_i = O⁽ᵀᶜ⁾ / ℓ⁽ᵀᶜ⁾,  L_i = m + log ℓ.

The result is softmax attention exactly (up to float rounding): only the order of the sums changes. On a GPU
the tiles live in on-chip SRAM and HBM sees Q, K, V once per tile pass and O once, which is the whole point;
here the loop only shows the arithmetic (kernels/flash_attention.py is the Triton kernel that does the same).
Glossary: B_r, B_c ``block_q``, ``block_k`` · m row max · ℓ row sum · O running output · L log-sum-exp.
Left out: the backward pass (recomputing P from L tile by tile) and dropout.
"""

from __future__ import annotations

import math

import torch

from effref.attention.interface import check_qkv, expand_kv, positive_int


def flash_attention_tiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                          block_q: int = 64, block_k: int = 64, scale: float | None = None,
                          return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention computed with FlashAttention-2's online softmax over (block_q × block_k) tiles.

    Never holds more than one (block_q, block_k) tile of scores per head. ``return_lse`` also returns the
    log-sum-exp L (B, H, T_q) that the backward pass would keep.
    """
    group = check_qkv(q, k, v, causal)
    positive_int("block_q", block_q, "use a tile height such as 64")
    positive_int("block_k", block_k, "use a tile width such as 64")
    k, v = expand_kv(k, group), expand_kv(v, group)  # (B, H, T_k, D)
    scale = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    B, H, T_q, _ = q.shape
    T_k = k.shape[2]
    out = torch.empty_like(q)  # (B, H, T_q, D)
    lse = torch.empty(B, H, T_q, dtype=torch.float32, device=q.device)  # (B, H, T_q)
    for q0 in range(0, T_q, block_q):
        q_tile = q[:, :, q0:q0 + block_q].float()  # (B, H, B_r, D)
        rows = torch.arange(q0, q0 + q_tile.shape[2], device=q.device)  # (B_r,) query positions
        m = torch.full(q_tile.shape[:3], float("-inf"), device=q.device)  # (B, H, B_r)
        ell = torch.zeros_like(m)  # (B, H, B_r)
        acc = torch.zeros_like(q_tile)  # (B, H, B_r, D)
        k_end = min(T_k, q0 + q_tile.shape[2]) if causal else T_k  # FlashAttention-2: skip tiles above the diagonal
        for k0 in range(0, k_end, block_k):
            k_tile = k[:, :, k0:k0 + block_k].float()  # (B, H, B_c, D)
            v_tile = v[:, :, k0:k0 + block_k].float()  # (B, H, B_c, D)
            s = q_tile @ k_tile.transpose(-1, -2) * scale  # (B, H, B_r, B_c)  S⁽ʲ⁾
            if causal:
                cols = torch.arange(k0, k0 + k_tile.shape[2], device=q.device)  # (B_c,)
                s = s.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))  # (B, H, B_r)  finite: key 0 … i are never all masked
            alpha = torch.exp(m - m_new)  # (B, H, B_r)  rescales what was summed under the old maximum
            p = torch.exp(s - m_new[..., None])  # (B, H, B_r, B_c)  P̃⁽ʲ⁾
            ell = alpha * ell + p.sum(dim=-1)
            acc = alpha[..., None] * acc + p @ v_tile
            m = m_new
        out[:, :, q0:q0 + block_q] = (acc / ell[..., None]).to(q.dtype)  # one division per row, at the end
        lse[:, :, q0:q0 + block_q] = m + torch.log(ell)
    return (out, lse) if return_lse else out
