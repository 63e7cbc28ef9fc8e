"""Recovery after pruning: a short LoRA fine-tune with the language-model loss, merged back into the weights.

Paper: LLM-Pruner (Ma, Fang, Wang, 2023, arXiv:2305.11627) §3.3 "Fast recovery with low-rank approximation",
with LoRA (Hu et al., 2022, arXiv:2106.09685) from ``effref.peft.lora``.
Implements: ΔW = (α/r) B A on every linear of the pruned model (embeddings and head frozen), trained with
next-token cross-entropy on random windows of a token stream, then W ← W + ΔW and the adapter modules are
dropped, so the recovered model has exactly the pruned shapes and no extra parameters.
Glossary: r LoRA rank · α scale · B A the adapter factors · ids the training token stream.
Left out: the paper's instruction data (Alpaca) and its learning-rate schedule; we use book text and AdamW.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effref.models.calls import forward_logits
from effref.peft.core import replace_module
from effref.peft.lora import LoraConfig, apply_lora, lora_layers, merge_lora
from effref.runtime import progress_bar


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` (B, T) under ``model`` (either model class)."""
    logits = forward_logits(model, batch)  # (B, T, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least, fp64 stays fp64
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())


def lora_recover(model: nn.Module, ids: torch.Tensor, steps: int, lora: LoraConfig | None = None,
                 lr: float = 3e-4, batch_size: int = 4, seq_len: int = 128, seed: int = 0,
                 progress: bool = True) -> list[float]:
    """Stage 3: train LoRA adapters on every linear with the LM loss on ``ids`` (N,), merge them, drop them.

    Returns the training losses. Afterwards the model has its pruned shapes and no adapter modules.
    """
    from effref.data import calibration_batches

    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)} - {"lm_head"})
    lora = lora or LoraConfig(r=8, alpha=16, target_modules=tuple(names))
    flags = {p: p.requires_grad for p in model.parameters()}
    apply_lora(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    device, losses, was_training = next(model.parameters()).device, [], model.training
    model.train()
    try:
        for step in progress_bar(range(steps), desc="LoRA recovery", disable=not progress):
            batch = calibration_batches(ids, batch_size, seq_len, seed=seed + step).to(device)  # (B, T)
            loss = lm_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        model.train(was_training)
        merge_lora(model)
        for name, layer in lora_layers(model).items():  # keep the merged base linear only
            replace_module(model, name, layer.base)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return losses
