"""BiLD, the Big Little Decoder: the draft decides when to ask, the target decides what to undo.

Paper: Kim, Mangalam, Moon, Malik, Mahoney, Gholami, Keutzer (2023), "Speculative Decoding with Big Little
Decoder", arXiv:2302.07863 — §3 (the fallback policy and the rollback policy).
Implements (greedy decoding):
  fallback: the little model generates token by token while its top probability max_y p_S(y | ·) ≥ α_FB
  (and at most N_max tokens are waiting); when it is unsure, control falls back to the big model, which runs
  once, non-autoregressively, over all waiting tokens and predicts the next one;
  rollback: a waiting token y_i is wrong when the big model's cross-entropy d(p_L, y_i) = −log p_L(y_i | ·)
  exceeds α_RB; the output is cut at the first such i and the big model's argmax replaces y_i. Otherwise
  every waiting token is kept and the big model's argmax after them is appended.
Unlike greedy speculative decoding the output is NOT guaranteed to equal the big model's greedy output: a
little-model token the big model finds merely plausible (d ≤ α_RB) is kept. At α_RB = 0 every little-model
token with p_L < 1 is rolled back, which is exact but no faster than the big model alone.
Glossary: S little (draft) model · L big (target) model · α_FB ``fallback_threshold`` · α_RB
          ``rollback_threshold`` (nats) · N_max ``max_draft``.
Left out: the paper's encoder-decoder setting and its fine-tuning of the little model to align it with the big
          one (we use an off-the-shelf draft); sampling (the paper evaluates greedy decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effref.inference.speculative import SpeculativeResult, SpeculativeState, draft_tokens, speculative_loop
from effref.models.llama import Llama, require_llama


@dataclass(frozen=True)
class BiLDConfig:
    fallback_threshold: float = 0.5  # α_FB: fall back when the little model's top probability is below it
    rollback_threshold: float = 2.0  # α_RB: roll back when −log p_L(y) exceeds it (nats)
    max_draft: int = 8  # N_max: fall back after this many little-model tokens anyway

    def __post_init__(self) -> None:
        if not 0 <= self.fallback_threshold <= 1:
            raise ValueError(f"fallback_threshold={self.fallback_threshold} is a probability; use a value in "
                             "[0, 1] (0: never fall back early)")
        if not self.rollback_threshold >= 0:
            raise ValueError(f"rollback_threshold={self.rollback_threshold} is a cross-entropy in nats; use a "
                             "value >= 0 (0: roll back every token the big model is not certain of)")
        if isinstance(self.max_draft, bool) or not isinstance(self.max_draft, int) or self.max_draft < 1:
            raise ValueError(f"max_draft={self.max_draft!r} must be an integer >= 1")


def bild_verify(log_p: torch.Tensor, drafted: torch.Tensor, rollback_threshold: float) -> tuple[int, int]:
    """Rollback policy: (little-model tokens kept, big model's next token) from log-probs (n+1, V) of L."""
    n = drafted.numel()
    if log_p.ndim != 2 or log_p.shape[0] != n + 1:
        raise ValueError(f"log_p {tuple(log_p.shape)} must be (n + 1, V) for n={n} drafted tokens")
    cross_entropy = -log_p[torch.arange(n), drafted]  # (n,) d(p_L, y_i)
    wrong = (cross_entropy > rollback_threshold).nonzero()
    kept = int(wrong[0]) if len(wrong) else n
    return kept, int(log_p[kept].argmax())


@torch.no_grad()
def bild_generate(target: Llama, draft: Llama, prompt: torch.Tensor, max_new_tokens: int,
                  config: BiLDConfig = BiLDConfig(), eos_id: int | None = None) -> SpeculativeResult:
    """Greedy BiLD decoding of ``max_new_tokens`` tokens with big model ``target`` and little model ``draft``."""
    require_llama(target, "target")
    require_llama(draft, "draft")

    def step(state: SpeculativeState) -> tuple[list[int], int, int, torch.Tensor]:
        drafted, _, calls = draft_tokens(draft, state.tokens, state.draft_cache, config.max_draft,
                                         min_confidence=config.fallback_threshold)
        feed = state.tokens[state.target_cache.length:] + drafted  # fallback: one big-model pass
        logits = target(torch.tensor([feed], device=state.target_cache.k[0].device), state.target_cache)
        log_p = logits[0, -(len(drafted) + 1):].float().log_softmax(-1).cpu()  # (n + 1, V)
        kept, token = bild_verify(log_p, torch.tensor(drafted, dtype=torch.long), config.rollback_threshold)
        state.target_cache.truncate(len(state.tokens) + kept)
        state.draft_cache.truncate(min(state.draft_cache.length, len(state.tokens) + kept))
        state.tokens += drafted[:kept] + [token]
        return drafted[:kept] + [token], calls, len(drafted), torch.zeros(0)

    return speculative_loop(target, draft, prompt, max_new_tokens, step, config.max_draft + 1, eos_id)
