"""LLM-Pruner: remove whole attention heads and MLP channels, chosen by first-order Taylor importance.

Paper: Ma, Fang, Wang (2023), "LLM-Pruner: On the Structural Pruning of Large Language Models",
arXiv:2305.11627 — §3.1 (dependency-based coupled groups), §3.2 (Eq. 2–5: Taylor importance, summed over
the group), §3.3 (LoRA recovery).
Implements three stages for LLaMA blocks (transformers' ``LlamaDecoderLayer`` or our ``Block``):
  1. Discovery. Coupled groups, hand-written for LLaMA (the paper traces them automatically): an MLP channel c
     = row c of gate and up + column c of down; a query head h = its d_head rows of q + its d_head columns
     of o; a key/value group = its k and v rows + all of its query heads.
     GQA (n_kv < n_heads): ``heads="query"`` removes query heads only, the same number from every kv group
     (k, v and the KV cache keep their size; each group keeps >= 1 head); ``heads="group"`` removes whole
     key/value groups with their query heads (smaller cache, coarser steps). "auto" = query for GQA, group
     (= ordinary head pruning) for MHA.
  2. Estimation. From the loss gradient G accumulated over a few batches: vector-wise importance
     I(W_slice) = |Σ W ⊙ G| (Eq. 3's first-order term) or element-wise Σ |W ⊙ G| (Eq. 5); a group's
     importance is the sum over its slices (the paper's "summation" aggregation). In each pruned block the
     fraction ``ratio`` of lowest-importance units is removed (block-wise, as in the paper), physically:
     new, smaller nn.Linear modules and updated head counts, so the model is really smaller and faster.
  3. Recovery: ``effref.pruning.recovery.lora_recover`` (LoRA on every linear, LM loss, merged back).
Glossary: W, G weight and gradient · d_head head size · gs = n_heads / n_kv query heads per group
          · d_ff MLP width · ratio fraction of units removed per pruned block.
Left out: automatic dependency tracing of arbitrary architectures, channel-wise pruning of the hidden size,
          second-order (Hessian-diagonal) importance, the paper's Alpaca recovery data (we use book text).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from effref.checks import config_or_default
from effref.compression.calibration import find_blocks
from effref.pruning.recovery import lm_loss
from effref.runtime import progress_bar

MODES, IMPORTANCE = ("auto", "query", "group"), ("vector", "element")


@dataclass
class LLMPrunerConfig:
    ratio: float = 0.2  # fraction of heads (rounded per group) and MLP channels removed in each pruned block
    heads: str = "auto"
    importance: str = "vector"
    first: int = 0  # prune blocks first .. last - 1 (the paper keeps the first and last few blocks intact)
    last: int | None = None
    prune_attention: bool = True
    prune_mlp: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise ValueError(f"ratio={self.ratio!r} must be in [0, 1) (the fraction of units removed per block)")
        if self.heads not in MODES:
            raise ValueError(f"heads={self.heads!r} is not known; use one of {MODES}")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance={self.importance!r} is not known; use one of {IMPORTANCE}")


@dataclass
class Parts:
    """The coupled modules of one LLaMA block, whichever implementation it comes from."""

    attn: nn.Module
    mlp: nn.Module
    names: dict[str, str]  # role (q, k, v, o, gate, up, down) -> attribute name in attn / mlp
    d_head: int

    def get(self, role: str) -> nn.Linear:
        return getattr(self.attn if role in "qkvo" else self.mlp, self.names[role])

    def set(self, role: str, linear: nn.Linear) -> None:
        setattr(self.attn if role in "qkvo" else self.mlp, self.names[role], linear)

    @property
    def n_heads(self) -> int:
        return self.get("q").out_features // self.d_head

    @property
    def n_kv(self) -> int:
        return self.get("k").out_features // self.d_head


def block_parts(block: nn.Module) -> Parts:
    """The attention and MLP linears of a transformers ``LlamaDecoderLayer`` or an effref ``Block``."""
    attn, mlp = getattr(block, "self_attn", None) or getattr(block, "attn", None), getattr(block, "mlp", None)
    mlp_names = ({"gate": "gate_proj", "up": "up_proj", "down": "down_proj"} if hasattr(mlp, "gate_proj")
                 else {"gate": "gate", "up": "up", "down": "down"})
    names = {r: f"{r}_proj" for r in "qkvo"} | mlp_names
    missing = [n for r, n in names.items() if not isinstance(getattr(attn if r in "qkvo" else mlp, n, None), nn.Linear)]
    if attn is None or mlp is None or missing:
        raise ValueError(f"{type(block).__name__} is not a LLaMA-shaped block (LLM-Pruner's coupled structures "
                         f"here are q/k/v/o heads and a gate/up/down MLP; missing: "
                         f"{'self_attn / mlp' if attn is None or mlp is None else missing}); use a LLaMA, Mistral, "
                         "Qwen2 or Gemma model, or an unstructured pruner (wanda_prune_model works on every family)")
    d_head = getattr(attn, "head_dim", None) or attn.d_head
    return Parts(attn, mlp, names, d_head)


def unit_scores(linear: nn.Linear, dim: int, unit: int, mode: str) -> torch.Tensor:
    """Taylor importance of consecutive slices of ``unit`` rows (dim 0) or columns (dim 1): (n_units,)."""
    if linear.weight.grad is None:
        raise ValueError("a pruned linear has no gradient; run taylor_gradients(model, batches) first")
    prod = (linear.weight * linear.weight.grad).detach().float()  # (out, in) w ⊙ g
    prod = prod if dim == 0 else prod.T  # slices along dim 0
    prod = prod.reshape(prod.shape[0] // unit, -1)  # (n_units, unit · other)
    return prod.sum(1).abs() if mode == "vector" else prod.abs().sum(1)  # Eq. 3 | Eq. 5


def _sliced(linear: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A new nn.Linear holding only rows (dim 0) or columns (dim 1) ``keep`` of ``linear``."""
    weight = linear.weight.detach().index_select(dim, keep)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach() if dim == 1 else linear.bias.detach()[keep])
    return new


def _rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of the rows of ``units`` (each ``size`` long), in order."""
    return (units[:, None] * size + torch.arange(size, device=units.device)).reshape(-1)


def plan_block(block: nn.Module, cfg: LLMPrunerConfig) -> dict:
    """Which heads and MLP channels of one block to keep (gradients must be present); changes nothing.

    Returns the kept indices (``kept_heads``, ``kept_kv``, ``kept_channels``, in the block's original numbering)
    of what is pruned, and ``kv_heads``, the key/value head count after pruning.
    """
    plan: dict = {}
    p = block_parts(block)
    dh, n_heads, n_kv = p.d_head, p.n_heads, p.n_kv
    gs = n_heads // n_kv
    mode = cfg.heads if cfg.heads != "auto" else ("query" if gs > 1 else "group")
    if mode == "query" and gs == 1 and cfg.prune_attention and cfg.ratio > 0:
        raise ValueError("heads='query' needs grouped-query attention (n_heads > n_kv_heads); with one query "
                         "head per key/value head use heads='group' (ordinary head pruning)")
    if cfg.prune_attention:
        head = unit_scores(p.get("q"), 0, dh, cfg.importance) + unit_scores(p.get("o"), 1, dh, cfg.importance)
        if mode == "query":  # the same number of query heads leaves every key/value group
            drop = min(round(cfg.ratio * gs), gs - 1)
            per_group = head.view(n_kv, gs)  # (n_kv, gs)
            kept = per_group.topk(gs - drop, dim=1).indices.sort(dim=1).values  # (n_kv, gs − drop)
            heads = (kept + torch.arange(n_kv, device=kept.device)[:, None] * gs).reshape(-1)
            kv_keep = torch.arange(n_kv, device=kept.device)
        else:  # whole key/value groups with their query heads
            drop = min(round(cfg.ratio * n_kv), n_kv - 1)
            group = head.view(n_kv, gs).sum(1) + unit_scores(p.get("k"), 0, dh, cfg.importance) \
                + unit_scores(p.get("v"), 0, dh, cfg.importance)  # (n_kv,)
            kv_keep = group.topk(n_kv - drop).indices.sort().values
            heads = _rows(kv_keep, gs)
        plan |= {"kept_heads": heads.tolist(), "kept_kv": kv_keep.tolist()}
    if cfg.prune_mlp:
        channel = sum(unit_scores(p.get(r), d, 1, cfg.importance) for r, d in (("gate", 0), ("up", 0), ("down", 1)))
        d_ff = channel.numel()
        plan["kept_channels"] = channel.topk(d_ff - min(round(cfg.ratio * d_ff), d_ff - 1)).indices.sort().values.tolist()
    return plan | {"kv_heads": len(plan.get("kept_kv", range(n_kv)))}


def apply_plan(block: nn.Module, plan: dict) -> dict:
    """Slice one block to the kept heads and channels of ``plan``; return its new counts and the plan."""
    p = block_parts(block)
    dh = p.d_head
    if "kept_heads" in plan:
        heads, kv_keep = torch.tensor(plan["kept_heads"]), torch.tensor(plan["kept_kv"])
        p.set("q", _sliced(p.get("q"), _rows(heads, dh), 0))
        p.set("o", _sliced(p.get("o"), _rows(heads, dh), 1))
        p.set("k", _sliced(p.get("k"), _rows(kv_keep, dh), 0))
        p.set("v", _sliced(p.get("v"), _rows(kv_keep, dh), 0))
        if hasattr(p.attn, "num_key_value_groups"):  # transformers: query heads per kv head
            p.attn.num_key_value_groups = len(heads) // len(kv_keep)
        if hasattr(p.attn, "n_kv_heads"):  # effref.models.llama.Attention
            p.attn.n_heads, p.attn.n_kv_heads = len(heads), len(kv_keep)
    if "kept_channels" in plan:
        keep = torch.tensor(plan["kept_channels"])
        for role, dim in (("gate", 0), ("up", 0), ("down", 1)):
            p.set(role, _sliced(p.get(role), keep, dim))
    return block_shape(p) | {k: v for k, v in plan.items() if k.startswith("kept_")}


def prune_block(block: nn.Module, cfg: LLMPrunerConfig) -> dict:
    """Remove the least important heads and MLP channels of one block (gradients must be present).

    Returns the new counts (heads, kv_heads, d_ff) and the kept indices (``kept_heads``, ``kept_kv``,
    ``kept_channels``, in the block's original numbering) of what was pruned.
    """
    return apply_plan(block, plan_block(block, cfg))


def block_shape(p: Parts) -> dict[str, int]:
    return {"heads": p.n_heads, "kv_heads": p.n_kv, "d_ff": p.get("up").out_features}


def taylor_gradients(model: nn.Module, batches: torch.Tensor, batch_size: int = 2,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """Accumulate ∂L/∂W of the LM loss over ``batches`` (n, T) in every parameter's ``.grad``; also return
    them as {parameter name: gradient} (to prune copies of the model without recomputing them)."""
    model.zero_grad(set_to_none=True)
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        for start in progress_bar(range(0, len(batches), batch_size), desc="gradients", disable=not progress):
            chunk = batches[start:start + batch_size].to(next(model.parameters()).device)
            (lm_loss(model, chunk) * len(chunk) / len(batches)).backward()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def llm_prune(model: nn.Module, batches: torch.Tensor | None, cfg: LLMPrunerConfig, batch_size: int = 2,
              progress: bool = True, gradients: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """Structurally prune ``model`` in place (stages 1–2); returns each block's new counts and kept indices.

    The gradients come from ``batches`` (n, T) token ids, or from ``gradients`` = the dict returned by
    ``taylor_gradients`` on an identical model (to prune copies of one dense model at several ratios).
    """
    cfg = config_or_default(cfg, LLMPrunerConfig, "LLMPrunerConfig(ratio=0.3)")
    prefix, blocks = find_blocks(model)
    last = len(blocks) if cfg.last is None else cfg.last
    if not 0 <= cfg.first < last <= len(blocks):
        raise ValueError(f"first={cfg.first}, last={cfg.last} must satisfy 0 <= first < last <= {len(blocks)}")
    chosen = range(cfg.first, last)
    for i in chosen:  # every pruned block is a LLaMA block with finite weights, before any work
        parts = block_parts(blocks[i])
        names = {id(m): n for n, m in blocks[i].named_modules()}
        for role in parts.names:
            if not parts.get(role).weight.isfinite().all():
                raise ValueError(f"{prefix}.{i}.{names[id(parts.get(role))]} has NaN or inf weights; LLM-Pruner's "
                                 "importance would be meaningless — fix or reload the checkpoint")
    try:
        if gradients is not None:
            for name, p in model.named_parameters():
                p.grad = gradients.get(name)
        elif batches is not None:
            taylor_gradients(model, batches, batch_size, progress)
        else:
            raise ValueError("pass batches=(n, T) token ids or gradients=taylor_gradients(dense_model, batches)")
        with torch.no_grad():
            plans = {i: plan_block(blocks[i], cfg) for i in chosen}  # all decided before the first block changes
    finally:
        model.zero_grad(set_to_none=True)
    if hasattr(model, "cfg"):  # our Llama preallocates one KV-cache shape for every layer
        kv = {plans[i]["kv_heads"] if i in plans else block_parts(b).n_kv for i, b in enumerate(blocks)}
        if len(kv) > 1:
            raise ValueError(f"heads='group' would leave blocks with different key/value head counts {sorted(kv)}; "
                             "our Llama's KV cache needs one count: prune every block (first=0, last=None) or use "
                             "heads='query'")
        model.cfg.n_kv_heads = kv.pop()
    with torch.no_grad():
        shapes = [apply_plan(b, plans[i]) if i in plans else block_shape(block_parts(b)) for i, b in enumerate(blocks)]
    return shapes


def removed_fraction(model: nn.Module, cfg: LLMPrunerConfig) -> float:
    """Fraction of ``model``'s parameters that ``llm_prune`` with ``cfg`` would remove (shapes only)."""
    _, blocks = find_blocks(model)
    total = sum(p.numel() for p in model.parameters())
    removed = 0
    for i, block in enumerate(blocks):
        if not cfg.first <= i < (len(blocks) if cfg.last is None else cfg.last):
            continue
        p = block_parts(block)
        d, dh, gs, n_kv = p.get("q").in_features, p.d_head, p.n_heads // p.n_kv, p.n_kv
        mode = cfg.heads if cfg.heads != "auto" else ("query" if gs > 1 else "group")
        if cfg.prune_attention:
            removed += (min(round(cfg.ratio * gs), gs - 1) * n_kv * 2 * d * dh if mode == "query"
                        else min(round(cfg.ratio * n_kv), n_kv - 1) * (gs + 1) * 2 * d * dh)
        if cfg.prune_mlp:
            d_ff = p.get("up").out_features
            removed += min(round(cfg.ratio * d_ff), d_ff - 1) * 3 * d
    return removed / total


def ratio_for_fraction(model: nn.Module, fraction: float, cfg: LLMPrunerConfig | None = None) -> LLMPrunerConfig:
    """``cfg`` with the ratio (on a 0.001 grid) whose removed parameter fraction is closest to ``fraction``."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction={fraction} must be in [0, 1) (of the model's parameters)")
    cfg = config_or_default(cfg, LLMPrunerConfig, "LLMPrunerConfig(ratio=0.3)")
    return min((replace(cfg, ratio=r / 1000) for r in range(1000)),
               key=lambda c: abs(removed_fraction(model, c) - fraction))
