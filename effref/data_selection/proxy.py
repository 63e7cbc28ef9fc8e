"""A tiny next-byte language model: the proxy and the trainee of the data-selection experiments.

DoReMi (Xie et al. 2023a) needs a *small* proxy model trained many times over; the chapter needs models
trained on differently selected data for the same budget. Both use this model: the last ``context``
bytes, embedded and concatenated, go through one hidden layer to next-byte logits (Bengio et al. 2003's
neural n-gram model). It trains in seconds on a CPU, which is the point.
Glossary: V = ``vocab_size`` (256 bytes) · C = ``context`` · D = ``dim`` · H = ``hidden``.
Left out: attention and any context beyond C bytes — enough to tell prose from code, not to write either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from effref.runtime import progress_bar

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs (B, C) long, targets (B,) long


class TinyNextTokenLM(nn.Module):
    """Embed the last ``context`` tokens, concatenate, one tanh layer, logits over ``vocab_size``."""

    def __init__(self, vocab_size: int = 256, context: int = 8, dim: int = 32, hidden: int = 256) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab_size, dim)
        self.hidden = nn.Linear(context * dim, hidden)
        self.out = nn.Linear(hidden, vocab_size)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:  # inputs (B, C) -> logits (B, V)
        x = self.embed(inputs).flatten(1)  # (B, C·D)
        return self.out(torch.tanh(self.hidden(x)))  # (B, V)


def text_bytes(text: str) -> torch.LongTensor:
    """The UTF-8 bytes of ``text`` as token ids 0…255: (N,)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def sample_windows(ids: torch.LongTensor, batch: int, context: int, generator: torch.Generator) -> Batch:
    """``batch`` random (``context`` ids, next id) pairs from the 1-D ``ids``: ((B, C), (B,))."""
    if len(ids) <= context:
        raise ValueError(f"ids has {len(ids)} tokens; sampling windows of context={context} needs more")
    starts = torch.randint(0, len(ids) - context, (batch,), generator=generator)  # (B,)
    positions = starts[:, None] + torch.arange(context + 1)  # (B, C+1)
    windows = ids[positions]  # (B, C+1)
    return windows[:, :-1], windows[:, -1]


def mixture_batch(domains: Sequence[torch.LongTensor], weights: torch.Tensor, batch: int, context: int,
                  generator: torch.Generator) -> Batch:
    """A batch whose examples come from domain ``i`` with probability ``weights[i]``."""
    choice = torch.multinomial(weights.double(), batch, replacement=True, generator=generator)  # (B,)
    counts = torch.bincount(choice, minlength=len(domains))  # (k,)
    parts = [sample_windows(ids, int(c), context, generator) for ids, c in zip(domains, counts) if c > 0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def train_lm(model: nn.Module, next_batch: Callable[[torch.Generator], Batch], steps: int, lr: float = 3e-3,
             seed: int = 0, desc: str = "train") -> list[float]:
    """Adam on the mean next-token cross-entropy of ``steps`` batches from ``next_batch``; the losses."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in progress_bar(range(steps), desc=desc, leave=False):
        inputs, targets = next_batch(generator)
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def mean_loss(model: nn.Module, ids: torch.LongTensor, windows: int = 4096, seed: int = 0) -> float:
    """Mean next-token cross-entropy (nats) on ``windows`` seeded random windows of ``ids``."""
    inputs, targets = sample_windows(ids, windows, model.context, torch.Generator().manual_seed(seed))
    return F.cross_entropy(model(inputs), targets).item()
