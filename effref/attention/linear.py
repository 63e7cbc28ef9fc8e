"""Linear Transformer: attention as a kernel feature map, computed in time linear in the sequence length.

Paper: Katharopoulos, Vyas, Pappas, Fleuret (2020), "Transformers are RNNs", arXiv:2006.16236 — Section 3.2
(linearized attention), 3.3 (causal masking), 3.4 (the recurrent form).
Replace the similarity exp(q·k/√D) by a kernel φ(q)ᵀφ(k) with φ(x) = elu(x) + 1 (positive everywhere);
then the sum over keys factors and no T × T matrix is formed:

    out_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ  /  φ(q_i)ᵀ Σ_j φ(k_j).

Causal: the sums run over j ≤ i, i.e. prefix sums S_i = Σ_{j≤i} φ(k_j) v_jᵀ (D × D) and
z_i = Σ_{j≤i} φ(k_j). The same prefix sums read one step at a time are a recurrent network:
S_i = S_{i−1} + φ(k_i) v_iᵀ, z_i = z_{i−1} + φ(k_i), out_i = φ(q_i)ᵀ S_i / φ(q_i)ᵀ z_i, constant memory per
generated token (Section 3.4). ``kernel_attention`` takes any non-negative features, so Performer
(performer.py) reuses it.
Glossary: φ feature map · S Σ φ(k) vᵀ (``kv``) · z Σ φ(k) (``k_sum``) · F feature dimension (D here).
Left out: the paper's CUDA kernel for the causal gradient (autograd through ``cumsum`` stores all T prefix
states, O(T·F·D) memory, where the paper's kernel stores O(F·D)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effref.attention.interface import check_qkv, expand_kv


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = elu(x) + 1 > 0, elementwise."""
    return F.elu(x) + 1


def kernel_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """out_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / φ(q_i)ᵀ Σ_j φ(k_j) for features φ(q), φ(k) (B, H, T, F), v (B, H, T, D).

    Non-causal sums run over all keys, causal ones over j ≤ i as prefix sums.
    """
    if causal:
        kv = torch.cumsum(phi_k[..., :, None] * v[..., None, :], dim=2)  # (B, H, T, F, D)  S_i
        k_sum = torch.cumsum(phi_k, dim=2)  # (B, H, T, F)  z_i
        numerator = torch.einsum("bhtf,bhtfd->bhtd", phi_q, kv)  # (B, H, T, D)
    else:
        kv = torch.einsum("bhtf,bhtd->bhfd", phi_k, v)  # (B, H, F, D)  S
        k_sum = phi_k.sum(dim=2, keepdim=True)  # (B, H, 1, F)  z
        numerator = phi_q @ kv  # (B, H, T, D)
    denominator = (phi_q * k_sum).sum(dim=-1, keepdim=True)  # (B, H, T, 1)
    return numerator / denominator.clamp_min(torch.finfo(denominator.dtype).tiny)  # > 0 unless all underflow


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    """Linear attention with φ = elu + 1: causal by prefix sums, else by one sum over keys."""
    group = check_qkv(q, k, v, causal)
    k, v = expand_kv(k, group), expand_kv(v, group)  # (B, H, T, D)
    return kernel_attention(elu_feature_map(q), elu_feature_map(k), v, causal)


def linear_attention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal linear attention as a recurrent network: one token per step, state (S, z)."""
    group = check_qkv(q, k, v, causal=True)
    k, v = expand_kv(k, group), expand_kv(v, group)  # (B, H, T, D)
    phi_q, phi_k = elu_feature_map(q), elu_feature_map(k)  # (B, H, T, D)
    B, H, T, D = q.shape
    state = q.new_zeros(B, H, D, v.shape[-1])  # (B, H, F, D)  S
    k_sum = q.new_zeros(B, H, D)  # (B, H, F)  z
    outputs = []
    for t in range(T):
        state = state + phi_k[:, :, t, :, None] * v[:, :, t, None, :]  # S_t = S_{t−1} + φ(k_t) v_tᵀ
        k_sum = k_sum + phi_k[:, :, t]  # z_t = z_{t−1} + φ(k_t)
        numerator = torch.einsum("bhf,bhfd->bhd", phi_q[:, :, t], state)  # (B, H, D)
        denominator = (phi_q[:, :, t] * k_sum).sum(dim=-1, keepdim=True)  # (B, H, 1)
        outputs.append(numerator / denominator)
    return torch.stack(outputs, dim=2)  # (B, H, T, D)
