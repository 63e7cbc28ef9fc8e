"""AlpaGasus-style filtering: a grader model rates every (instruction, response) pair; keep the high ones.

Paper: Chen, Li, Yan, Wang, Gunaratna, Yadav, Tang, Srinivasan, Zhou, Huang, Jin (2023d), "AlpaGasus:
Training a Better Alpaca with Fewer Data", arXiv:2307.08701 — §2 (the rating prompt, threshold τ = 4.5).
Implements: the grader reads a rating prompt for each pair and gives a score s ∈ [1, 5]; the training set
keeps the pairs with s ≥ τ (or the best fraction ``ratio`` of them). Our score is the grader's *expected
rating* over the five digit tokens after the prompt,

    s(x) = Σ_{r=1}^{5} r · p(r | prompt(x)) / Σ_{r=1}^{5} p(r | prompt(x)),

read in one forward pass instead of sampling a reply. A small model follows such an instruction poorly, so
a second grader asks it only what it can answer — how likely the response is after the instruction:

    s_LL(x) = (1/|r|) Σ_{t ∈ r} log p(r_t | prompt, r_<t)        (mean log-likelihood of the response r).

Glossary: x pair · s = ``scores`` · τ = ``threshold`` · p the grader's next-token distribution.
Simplified (name it so): the paper's grader is ChatGPT, which follows the rating instruction; here it is a
small causal LM (SmolLM2-135M in the book), whose digit probabilities are a noisy judgement at best, and
no explanation is generated; the log-likelihood grader replaces the judgement by the model's own
plausibility, which catches responses the model can tell are wrong and nothing subtler.
"""

from __future__ import annotations

import torch

from effref.data_selection.common import k_from_ratio, top_k_indices

RATING_PROMPT = ("Rate the accuracy and helpfulness of the response to the instruction on a scale of 1 to 5.\n"
                 "Instruction: {instruction}\nResponse: {response}\nRating (1-5): ")


def rating_token_ids(tokenizer, prompt: str) -> list[int]:
    """The token that continues ``prompt`` with each digit 1…5 (one token each, else ValueError)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    digits = []
    for rating in range(1, 6):
        ids = tokenizer(prompt + str(rating))["input_ids"]
        if len(ids) != len(prompt_ids) + 1 or ids[:-1] != prompt_ids:
            raise ValueError(f"the tokenizer does not continue the prompt with the digit {rating} as one token; "
                             "end the template so that a digit follows as its own token (e.g. with ': ' for "
                             "SmolLM2, ':' for GPT-2's ' 4' tokens)")
        digits.append(ids[-1])
    return digits


@torch.no_grad()
def grader_scores(model, tokenizer, pairs: list[tuple[str, str]], template: str = RATING_PROMPT) -> torch.Tensor:
    """The grader's expected rating in [1, 5] for every (instruction, response) pair: (N,) float64."""
    if not pairs:
        raise ValueError("pairs is empty; pass at least one (instruction, response) pair to grade")
    device = next(model.parameters()).device
    scores = []
    for instruction, response in pairs:
        prompt = template.format(instruction=instruction, response=response)
        digits = rating_token_ids(tokenizer, prompt)
        ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)  # (1, T)
        logits = model(ids).logits[0, -1]  # (V,)
        probs = torch.softmax(logits.double()[digits], dim=0)  # (5,) renormalized over the digits
        scores.append((probs * torch.arange(1, 6, dtype=torch.float64, device=device)).sum().item())
    return torch.tensor(scores, dtype=torch.float64)


LIKELIHOOD_PROMPT = "Question: {instruction}\nAnswer:"


@torch.no_grad()
def response_log_likelihood(model, tokenizer, pairs: list[tuple[str, str]], template: str = LIKELIHOOD_PROMPT
                            ) -> torch.Tensor:
    """Mean log-probability per token of each response after its prompt (the grader's plausibility): (N,)."""
    if not pairs:
        raise ValueError("pairs is empty; pass at least one (instruction, response) pair to grade")
    device = next(model.parameters()).device
    scores = []
    for instruction, response in pairs:
        prompt = template.format(instruction=instruction)
        prompt_length = len(tokenizer(prompt)["input_ids"])
        ids = tokenizer(f"{prompt} {response}")["input_ids"]
        if len(ids) <= prompt_length:
            raise ValueError(f"the response {response!r} adds no tokens to the prompt; pass a non-empty response")
        ids = torch.tensor([ids], device=device)  # (1, T)
        log_probs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)  # (T-1, V): predicts ids[1:]
        targets = ids[0, 1:]  # (T-1,)
        per_token = log_probs[torch.arange(len(targets), device=device), targets]  # (T-1,)
        scores.append(per_token[prompt_length - 1:].mean().item())  # the response's tokens only
    return torch.tensor(scores, dtype=torch.float64)


def alpagasus_filter(scores: torch.Tensor, threshold: float | None = None, ratio: float | None = None
                     ) -> torch.LongTensor:
    """Indices of the pairs to keep: score ≥ ``threshold`` (in order), or the best ``ratio`` (best first)."""
    if scores.dim() != 1 or len(scores) == 0:
        raise ValueError(f"scores must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    if (threshold is None) == (ratio is None):
        raise ValueError("pass exactly one of threshold (keep score ≥ threshold) and ratio (keep the best "
                         "fraction), e.g. threshold=4.5 as in the paper or ratio=0.2")
    if ratio is not None:
        return top_k_indices(scores, k_from_ratio(ratio, len(scores)))
    return (scores >= threshold).nonzero().flatten()
