"""The MoE chapter's bench: a tiny MoE decoder and its dense twin, and one training loop for both.

``tiny_pair`` builds a Mixtral-shaped MoE and a LLaMA-shaped dense model that are identical except for the MLPs:
the dense MLP is as wide as the K experts a token visits (d_ff = K · F), so both spend the same multiply-adds per
token (the router's E · D aside) while the MoE holds E/K times the MLP parameters. ``train_lm`` trains either on
random windows of a token stream with AdamW and cosine decay, adding every router's auxiliary loss to the
cross-entropy, and records each step's loss and each layer's tokens per expert; ``eval_loss`` is the mean
next-token cross-entropy on disjoint windows.
Glossary: E n_experts · K top_k · F d_ff of one expert · D d_model · load = tokens per expert in one step.
Left out: learning-rate warm-up, gradient accumulation, mixed precision; one batch of windows per step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from effref.models.llama import Llama, LlamaConfig
from effref.moe.experts import aux_loss, moe_layers
from effref.moe.mixtral import Mixtral, MixtralConfig
from effref.runtime import progress_bar


def tiny_pair(vocab_size: int = 256, d_model: int = 64, n_layers: int = 2, n_heads: int = 4, d_ff: int = 128,
              n_experts: int = 8, top_k: int = 1, max_seq_len: int = 256, seed: int = 0) -> tuple[Mixtral, Llama]:
    """(MoE with E experts of width F, dense model with one MLP of width K · F); everything but the MLPs (embedding,
    attention, norms) starts from the same weights in both."""
    common = dict(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
                  max_seq_len=max_seq_len, tie_embeddings=True)
    torch.manual_seed(seed)
    moe = Mixtral(MixtralConfig(**common, d_ff=d_ff, n_experts=n_experts, top_k=top_k))
    dense = Llama(LlamaConfig(**common, d_ff=top_k * d_ff))
    shared = {name: w for name, w in dense.state_dict().items() if ".mlp." not in name}
    missing, unexpected = moe.load_state_dict(shared, strict=False)
    assert not unexpected and all(".mlp." in name for name in missing)
    return moe, dense


@dataclass
class TrainLog:
    """What ``train_lm`` saw: cross-entropy and auxiliary loss per step, tokens per expert per step, seconds."""

    losses: list[float] = field(default_factory=list)
    aux: list[float] = field(default_factory=list)
    loads: list[list[torch.Tensor]] = field(default_factory=list)  # per step, one (E,) tensor per MoE layer
    seconds: float = 0.0

    def load_history(self, layer: int | None = None) -> torch.Tensor:
        """Tokens per expert: (steps, layers, E), or (steps, E) for one ``layer``; empty for a dense model."""
        if not self.loads:
            return torch.empty(0)
        if layer is not None:
            return torch.stack([step[layer] for step in self.loads])
        if len({len(row) for row in self.loads[0]}) > 1:
            raise ValueError("the MoE layers have different numbers of experts (a pyramid); ask for one layer "
                             "with load_history(layer=i)")
        return torch.stack([torch.stack(step) for step in self.loads])


def _windows(ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)  # (B,)
    return ids[starts[:, None] + torch.arange(seq_len + 1)]  # (B, seq_len + 1)


def train_lm(model: nn.Module, ids: torch.Tensor, steps: int, batch_size: int = 16, seq_len: int = 128,
             lr: float = 3e-3, seed: int = 0, progress: bool = True, desc: str = "training",
             after_step: Callable[[int], None] | None = None) -> TrainLog:
    """Next-token training on random windows of ``ids`` (N,); the loss adds every router's ``aux_loss``.

    ``after_step(step)`` (optional) runs after each optimiser step (0-based), e.g. to probe the routing or to
    switch StableMoE to its second stage; parameters it freezes simply stop receiving updates.
    """
    if steps < 1 or batch_size < 1 or not 2 <= seq_len < len(ids) - 1:
        raise ValueError(f"steps={steps}, batch_size={batch_size}, seq_len={seq_len}: need steps ≥ 1, "
                         f"batch_size ≥ 1 and 2 ≤ seq_len < len(ids) - 1 = {len(ids) - 1}")
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    log, start = TrainLog(), time.perf_counter()
    model.train()
    for step in progress_bar(range(steps), desc=desc, disable=not progress):
        window = _windows(ids, batch_size, seq_len, generator).to(device)  # (B, T + 1)
        logits = model(window[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), window[:, 1:].reshape(-1))
        layers = moe_layers(model)
        extra = aux_loss(model).to(loss.device) if layers else torch.zeros((), device=loss.device)
        optimizer.zero_grad(set_to_none=True)
        (loss + extra).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        log.losses.append(loss.item())
        log.aux.append(extra.item())
        if layers:
            log.loads.append([layer.routing.load().cpu() for layer in layers])  # one (E,) per layer
        if after_step is not None:
            after_step(step)
            model.train()
    model.eval()
    log.seconds = time.perf_counter() - start
    return log


@torch.no_grad()
def eval_loss(model: nn.Module, ids: torch.Tensor, seq_len: int = 128, n_windows: int = 16,
              batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over the first ``n_windows`` disjoint windows of ``ids``."""
    usable = min(n_windows, (len(ids) - 1) // seq_len)
    if usable < 1:
        raise ValueError(f"ids has {len(ids)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for first in range(0, usable, batch_size):
        rows = range(first, min(first + batch_size, usable))
        window = torch.stack([ids[r * seq_len:(r + 1) * seq_len + 1] for r in rows]).to(device)  # (b, T + 1)
        logits = model(window[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), window[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += window[:, 1:].numel()
    return total / count
