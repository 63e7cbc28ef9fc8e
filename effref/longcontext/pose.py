"""PoSE: train for a long context inside a short window, by skipping position ids.

Paper: Zhu, Yang, Wang, Song, Wu, Wei, Li (2023), "PoSE: Efficient Context Window Extension of LLMs via
Positional Skip-wise Training", arXiv:2309.10400 — §3.2.
Implements: a training window of L_c tokens is cut into N chunks c_0 … c_{N−1} of lengths l_i (Σ l_i = L_c;
here a uniformly random composition), chunk i starting at st_i = Σ_{j<i} l_j. Each chunk gets a skipping bias
  u_i ~ U{u_{i−1}, …, L_t − L_c}   (u_{−1} = 0; u_i ≥ u_{i−1} keeps chunks from overlapping),
and the position ids  PoSE(c_i) = {u_i + st_i, …, u_i + st_i + l_i − 1}.  Every id is < L_t, ids increase, and
over many draws every relative distance up to L_t − 1 occurs: the model learns L_t's positions at L_c's cost.
The content of each chunk is the text at those very positions (content skips v_i = u_i, one of the choices the
paper discusses): the token with id p is x[a + p] and its label x[a + p + 1], for a random start a.
``train_context`` is the next-token training loop of the chapter, plain (windows of L_c) or with PoSE.
Glossary: L_c window, the tokens per training sequence · L_t target_len · N n_chunks · l_i chunk lengths
          · st_i chunk starts · u_i skipping biases · a start of the excerpt in the text.
Left out: content skips v_i sampled independently of u_i, and the interpolation PoSE is combined with
          (install rope_scaling.py's tables on the same model first, as the paper does with PI, NTK and YaRN).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from effref.longcontext.positions import at_positions
from effref.models.llama import Llama, require_llama
from effref.runtime import progress_bar


@dataclass(frozen=True)
class PoSEConfig:
    """Simulate ``target_len`` positions with ``window``-token sequences cut into ``n_chunks`` chunks."""

    window: int  # L_c
    target_len: int  # L_t
    n_chunks: int = 2  # N (the paper's default)

    def __post_init__(self) -> None:
        for name in ("window", "target_len", "n_chunks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.target_len < self.window:
            raise ValueError(f"target_len={self.target_len} < window={self.window}: PoSE simulates a context "
                             "longer than the training window; use target_len >= window")
        if self.n_chunks > self.window:
            raise ValueError(f"n_chunks={self.n_chunks} > window={self.window}: every chunk needs a token")


def pose_position_ids(cfg: PoSEConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw of PoSE position ids, (window,): N increasing runs of consecutive ids, all < target_len."""
    W, N = cfg.window, cfg.n_chunks
    cuts = (torch.randperm(W - 1, generator=generator)[:N - 1] + 1).sort().values.tolist()  # N − 1 cut points
    bounds = [0, *cuts, W]  # st_0 = 0, …, st_{N−1}, L_c
    ids, u = [], 0
    for st, end in zip(bounds[:-1], bounds[1:]):
        u = int(torch.randint(u, cfg.target_len - W + 1, (), generator=generator))  # u_i ~ U{u_{i−1}..L_t − L_c}
        ids.append(torch.arange(st, end) + u)  # PoSE(c_i) = {u_i + st_i, …, u_i + st_i + l_i − 1}
    return torch.cat(ids)  # (W,)


def pose_batch(tokens: torch.Tensor, batch_size: int, cfg: PoSEConfig,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs and labels (batch_size, window) and their shared position ids (window,): row b holds the tokens
    x[a_b + p] at the ids p of one draw, labelled x[a_b + p + 1], for random starts a_b."""
    _check_tokens(tokens, cfg.target_len)
    positions = pose_position_ids(cfg, generator)  # (W,)
    starts = torch.randint(0, len(tokens) - cfg.target_len, (batch_size, 1), generator=generator)  # (B, 1)
    index = starts + positions[None, :]  # (B, W)
    return tokens[index], tokens[index + 1], positions


def _check_tokens(tokens: torch.Tensor, span: int) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1 or tokens.is_floating_point():
        raise ValueError("tokens must be a 1-D tensor of token ids (the training text, tokenized)")
    if len(tokens) < span + 2:
        raise ValueError(f"tokens has {len(tokens)} ids; sampling spans of {span} needs at least {span + 2}")


def train_context(model: Llama, tokens: torch.Tensor, steps: int, window: int, batch_size: int = 16,
                  lr: float = 3e-3, target_len: int | None = None, n_chunks: int = 2, seed: int = 0,
                  progress: bool = True) -> list[float]:
    """Next-token training on random ``window``-token excerpts of ``tokens`` with AdamW and cosine decay; with
    ``target_len``, PoSE position ids simulate that context (one draw per step). Returns the losses."""
    require_llama(model, "model")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"steps={steps}, batch_size={batch_size}, lr={lr}: need positive values")
    pose = None if target_len is None else PoSEConfig(window, target_len, n_chunks)
    if window < 1 or (target_len or window) > model.cfg.max_seq_len:
        raise ValueError(f"window={window}, target_len={target_len}: need 1 <= window and the longest position "
                         f"within max_seq_len={model.cfg.max_seq_len}; install longer tables first")
    _check_tokens(tokens, target_len or window)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    device = model.embed.weight.device
    model.train()
    losses = []
    try:
        for _ in progress_bar(range(steps), desc="training", disable=not progress):
            if pose is None:
                starts = torch.randint(0, len(tokens) - window - 1, (batch_size, 1), generator=generator)
                index = starts + torch.arange(window)  # (B, W)
                inputs, labels, where = tokens[index], tokens[index + 1], nullcontext()
            else:
                inputs, labels, positions = pose_batch(tokens, batch_size, pose, generator)
                where = at_positions(model, positions)
            with where:
                logits = model(inputs.to(device))  # (B, W, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.to(device).flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    finally:
        model.eval()
    return losses
