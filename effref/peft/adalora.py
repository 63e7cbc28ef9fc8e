"""AdaLoRA: LoRA in SVD form whose rank budget moves to the layers that matter, by importance scores.

Paper: Zhang, Chen, Bukharin, Karampatziakis, He, Cheng, Chen, Zhao (2023), "Adaptive Budget Allocation for
Parameter-Efficient Fine-Tuning", arXiv:2303.10512 — §3 (Eqs. 3–12), Algorithm 1.
Implements:
  ΔW = P Λ Q · α/r  (Eq. 3), P ∈ ℝ^{d×r}, Λ = diag(λ) ∈ ℝ^{r}, Q ∈ ℝ^{r×k}; Λ starts at 0 (model unchanged),
  R(P, Q) = ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F  (Eq. 4), added to the loss with weight γ (averaged over layers),
  sensitivity I(w) = |w · ∂L/∂w|, smoothed Ī ← β₁Ī + (1−β₁)I, uncertainty Ū ← β₂Ū + (1−β₂)|I − Ī|,
  score s(w) = Ī · Ū  (Eqs. 8–10), triplet score S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)  (Eq. 7),
  budget b(t): b₀ for t < t_i, then b_T + (b₀ − b_T)(1 − (t − t_i)/(T − t_i − t_f))³, then b_T  (Eq. 12);
  every ΔT steps the b(t) highest-scoring triplets of the whole model keep their λ, the others are set to 0
  (pruned triplets may come back at a later reallocation); after T − t_f the mask is frozen.
Glossary: P ``lora_B`` (d × r) · λ ``lora_E`` (r,) · Q ``lora_A`` (r × k) · r ``init_r`` per layer
          · b₀ = init_r × layers, b_T = target_r × layers · t_i ``t_init`` · t_f ``t_final`` · ΔT ``delta_t``
          · T ``total_steps`` · γ ``orth_weight``.
Left out: the paper's per-task hyper-parameter tables; DeBERTa/BART experiments (here: any linear-like layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from effref.checks import config_or_default
from effref.peft.core import MergeableAdapter, adapters_of, targets_or_default, wrap_modules


@dataclass
class AdaLoraConfig:
    init_r: int = 12
    target_r: int = 8  # average rank per layer at the end
    alpha: float = 16
    target_modules: tuple[str, ...] | None = None  # None: the model's query and value projections
    total_steps: int = 100
    t_init: int = 10
    t_final: int = 20
    delta_t: int = 5
    beta1: float = 0.85
    beta2: float = 0.85
    orth_weight: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.target_r <= self.init_r:
            raise ValueError(f"target_r={self.target_r}, init_r={self.init_r}: need 0 < target_r <= init_r")
        if self.t_init + self.t_final >= self.total_steps:
            raise ValueError(f"t_init={self.t_init} + t_final={self.t_final} must be < total_steps="
                             f"{self.total_steps}: the budget needs steps in between to shrink")
        if self.delta_t < 1 or not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"delta_t={self.delta_t} must be >= 1 and beta1={self.beta1}, beta2={self.beta2} in [0, 1)")
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)


class SVDLinear(MergeableAdapter):
    """``base(x) + (α/r) · P diag(λ) Q x`` around a linear-like ``base``."""

    def __init__(self, base: nn.Module, r: int, alpha: float):
        super().__init__()
        d, k = base.out_features, base.in_features
        if not 0 < r <= min(d, k):
            raise ValueError(f"init_r={r} must satisfy 0 < r <= min(in_features, out_features) = {min(d, k)}")
        w = next(iter(list(base.parameters()) + list(base.buffers())))
        dtype = w.dtype if w.is_floating_point() else torch.float32
        self.base, self.in_features, self.out_features = base, k, d
        self.r, self.scaling = r, alpha / r
        self.lora_A = nn.Parameter(torch.randn(r, k, dtype=dtype, device=w.device) * 0.02)  # Q: (r, k)
        self.lora_E = nn.Parameter(torch.zeros(r, dtype=dtype, device=w.device))  # λ: (r,)
        self.lora_B = nn.Parameter(torch.randn(d, r, dtype=dtype, device=w.device) * 0.02)  # P: (d, r)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B * self.lora_E) @ self.lora_A  # P diag(λ) Q: (d, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        h = x.to(self.lora_A.dtype) @ (self.lora_A * self.lora_E[:, None]).T  # (..., r): diag(λ) Q x
        return out + (self.scaling * h @ self.lora_B.T).to(out.dtype)  # (..., d)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight().to(weight.dtype)

    def orthogonality(self) -> torch.Tensor:
        """‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F (Eq. 4)."""
        eye = torch.eye(self.r, dtype=self.lora_A.dtype, device=self.lora_A.device)
        return ((self.lora_B.T @ self.lora_B - eye) ** 2).sum() + ((self.lora_A @ self.lora_A.T - eye) ** 2).sum()


def apply_adalora(model: nn.Module, cfg: AdaLoraConfig) -> nn.Module:
    """Wrap the target linears in ``SVDLinear`` (rank ``init_r``) and freeze everything else (in place)."""
    cfg = config_or_default(cfg, AdaLoraConfig, "AdaLoraConfig(init_r=12, target_r=8)")
    targets = targets_or_default(model, cfg.target_modules, "query_value")
    wrap_modules(model, targets, lambda name, layer: SVDLinear(layer, cfg.init_r, cfg.alpha), skip=(SVDLinear,))
    return model


def orthogonal_regulariser(model: nn.Module, weight: float) -> torch.Tensor:
    """γ · mean over SVD layers of R(P, Q); add it to the training loss."""
    layers = list(adapters_of(model, SVDLinear).values())
    return weight * torch.stack([layer.orthogonality() for layer in layers]).mean()


def budget(step: int, cfg: AdaLoraConfig, n_layers: int) -> int:
    """Total number of triplets kept at ``step`` (Eq. 12, cubic decrease from b₀ to b_T)."""
    b0, bT = cfg.init_r * n_layers, cfg.target_r * n_layers
    if step < cfg.t_init:
        return b0
    if step >= cfg.total_steps - cfg.t_final:
        return bT
    progress = (step - cfg.t_init) / (cfg.total_steps - cfg.t_init - cfg.t_final)
    return int(bT + (b0 - bT) * (1 - progress) ** 3)


class RankAllocator:
    """Keeps the smoothed sensitivities of every P, λ, Q entry and re-masks λ every ``delta_t`` steps.

    Call ``update(step)`` after the optimizer step and before the gradients are cleared (the training
    loop's ``after_update`` hook).
    """

    def __init__(self, model: nn.Module, cfg: AdaLoraConfig):
        self.cfg, self.layers = cfg, adapters_of(model, SVDLinear)
        self.ibar: dict[int, torch.Tensor] = {}
        self.ubar: dict[int, torch.Tensor] = {}
        self.mask: dict[str, torch.Tensor] | None = None
        self.history: list[tuple[int, int]] = []  # (step, budget) at each reallocation

    def _score(self, p: nn.Parameter) -> torch.Tensor:
        if p.grad is None:
            raise RuntimeError("RankAllocator.update needs gradients: call it after backward, before zero_grad")
        sensitivity = (p.detach() * p.grad.detach()).abs()  # I(w) = |w ∂L/∂w|
        key = id(p)
        ibar = self.ibar.get(key, torch.zeros_like(sensitivity))
        ubar = self.ubar.get(key, torch.zeros_like(sensitivity))
        ibar = self.cfg.beta1 * ibar + (1 - self.cfg.beta1) * sensitivity  # Eq. 9
        ubar = self.cfg.beta2 * ubar + (1 - self.cfg.beta2) * (sensitivity - ibar).abs()  # Eq. 10
        self.ibar[key], self.ubar[key] = ibar, ubar
        return ibar * ubar  # Eq. 8

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """{layer: (r,) scores S_i} after updating the smoothed statistics with the current gradients (Eq. 7)."""
        return {name: self._score(m.lora_E) + self._score(m.lora_B).mean(0) + self._score(m.lora_A).mean(1)
                for name, m in self.layers.items()}

    @torch.no_grad()
    def update(self, step: int) -> int:
        """Update the scores; at reallocation steps keep the top-b(t) triplets. Returns the current budget."""
        cfg = self.cfg
        scores = self.triplet_scores()
        b = budget(step, cfg, len(self.layers))
        frozen = step >= cfg.total_steps - cfg.t_final and self.mask is not None
        if not frozen and step >= cfg.t_init and (step - cfg.t_init) % cfg.delta_t == 0:
            flat = torch.cat([s for s in scores.values()])  # (n_layers · r,)
            threshold = flat.topk(b).values[-1] if b < len(flat) else flat.min() - 1
            self.mask = {name: s >= threshold for name, s in scores.items()}
            self.history.append((step, b))
        if self.mask is not None:
            for name, m in self.layers.items():
                m.lora_E.masked_fill_(~self.mask[name], 0.0)  # pruned triplets: λ_i = 0
        return b

    def ranks(self) -> dict[str, int]:
        """Current rank of every layer (number of triplets kept)."""
        if self.mask is None:
            return {name: m.r for name, m in self.layers.items()}
        return {name: int(keep.sum()) for name, keep in self.mask.items()}
