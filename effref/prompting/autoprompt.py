"""AutoPrompt: a discrete trigger found by gradient-guided search over the vocabulary.

Paper: Shin, Razeghi, Logan IV, Wallace, Singh (2020), "AutoPrompt: Eliciting Knowledge from Language Models
with Automatically Generated Prompts", EMNLP, arXiv:2010.15980 — §2.2, Eq. 2 (the HotFlip candidate set).
Implements: a prompt template holds T trigger slots whose tokens are shared by every example. One step picks a
slot j and scores every vocabulary token w by the first-order estimate of how much swapping it in would raise
the label's log-likelihood,
    V_cand = top-k_{w ∈ V} [ w_inᵀ ∇_{e_j} log p(y | x_prompt) ]          (Eq. 2, averaged over the batch),
then evaluates each candidate exactly on the batch and keeps the best one if it beats the current trigger.
For a causal LM the label y is the token predicted at the last position (the paper's [MASK] for BERT).
Glossary: x_prompt the filled template · e_j input embedding at trigger slot j · w_in input embedding of w ·
          k ``n_candidates`` · T ``len(trigger_positions)`` · y ``label_ids``.
Left out: the automatic search for label tokens (§2.3: ours are given), and filtering candidates that are
proper nouns or class labels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TriggerSearch:
    trigger: list[int]  # the token at every trigger slot
    losses: list[float]  # −mean log p(y | prompt) after every step (the first entry: the initial trigger)


def _label_loss(logits_fn, embeds: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
    logits = logits_fn(embeds)[:, -1]  # (B, V): the prediction at the last position
    return F.cross_entropy(logits, label_ids)


def autoprompt(logits_fn: Callable[[torch.Tensor], torch.Tensor], embedding: torch.Tensor, input_ids: torch.Tensor,
               trigger_positions: Sequence[int], label_ids: torch.Tensor, steps: int = 10, n_candidates: int = 10,
               init_token: int = 0, allowed: torch.Tensor | None = None, seed: int = 0) -> TriggerSearch:
    """Search trigger tokens for ``input_ids`` (B, T) whose ``trigger_positions`` are trigger slots.

    ``logits_fn(embeds (B, T, d)) -> (B, T, V)`` is the model run from input embeddings (for our Llama:
    ``lambda e: forward_embeds(model, e)``); ``embedding`` (V, d) its input embedding matrix; ``allowed`` (V,)
    bool restricts the candidates (e.g. to whole words). The slot of each step is drawn from ``seed``.
    """
    if input_ids.dim() != 2 or label_ids.shape != (input_ids.shape[0],):
        raise ValueError(f"input_ids {tuple(input_ids.shape)} must be (B, T) and label_ids "
                         f"{tuple(label_ids.shape)} (B,)")
    T, V = input_ids.shape[1], embedding.shape[0]
    if len(trigger_positions) == 0 or any(not 0 <= p < T - 1 for p in trigger_positions):
        raise ValueError(f"trigger_positions={list(trigger_positions)} must be non-empty positions in 0 .. {T - 2} "
                         "(the last position predicts the label)")
    if steps < 1 or not 1 <= n_candidates <= V:
        raise ValueError(f"steps={steps} must be >= 1 and n_candidates={n_candidates} in 1 .. {V}")
    allowed = torch.ones(V, dtype=torch.bool) if allowed is None else allowed
    slots = torch.tensor(list(trigger_positions))
    trigger = torch.full((len(slots),), init_token, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    weight = embedding.detach()

    def embeds_for(trig: torch.Tensor) -> torch.Tensor:
        ids = input_ids.clone()
        ids[:, slots] = trig.to(ids.device)
        return weight[ids]  # (B, T, d)

    with torch.no_grad():
        current = float(_label_loss(logits_fn, embeds_for(trigger), label_ids))
    losses = [current]
    for _ in range(steps):
        j = int(torch.randint(len(slots), (1,), generator=generator))
        embeds = embeds_for(trigger).requires_grad_(True)
        grad, = torch.autograd.grad(_label_loss(logits_fn, embeds, label_ids), embeds)  # (B, T, d)
        # Eq. 2: raising log p(y) = lowering the loss; the gradient of log p is −grad
        scores = -(weight @ grad[:, slots[j]].sum(0))  # (V,)
        scores[~allowed.to(scores.device)] = float("-inf")
        candidates = torch.topk(scores, n_candidates).indices
        best = trigger
        with torch.no_grad():
            for w in candidates.tolist():
                trial = trigger.clone()
                trial[j] = w
                loss = float(_label_loss(logits_fn, embeds_for(trial), label_ids))
                if loss < current:  # keep the best candidate, and only if it beats the current trigger
                    current, best = loss, trial
        trigger = best
        losses.append(current)
    return TriggerSearch(trigger.tolist(), losses)
