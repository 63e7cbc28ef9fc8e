"""LLMLingua-style prompt compression: a small LM's per-token information, a budget controller, and
iterative token-level compression that never drops protected spans.

Paper: Jiang, Wu, Lin, Yang, Qiu (2023), "LLMLingua: Compressing Prompts for Accelerated Inference of Large
Language Models", EMNLP, arXiv:2310.05736 — §3.1 (budget controller, Algorithm 1), §3.2 (iterative
token-level prompt compression, Algorithm 2).
Implements:
  information of a token: I(x_t) = −log p_small(x_t | x̃_<t), where x̃ is the *already compressed* prefix.
  budget controller: for a target ratio τ over a prompt of L = L_ins + L_dem + L_que tokens, the instruction
      and question keep their own ratios τ_ins, τ_que, and the demonstrations get what is left,
        B_dem = ⌊τ L⌋ − ⌊τ_ins L_ins⌋ − ⌊τ_que L_que⌋;
      coarse step: demonstrations sorted by perplexity, highest first, are kept while their tokens total at
      most k · B_dem (granular control k), then put back in their original order.
  iterative compression: the prompt is cut into segments of ``segment_len`` tokens; segment j is scored
      conditioned on the compressed segments before it, and its u_j highest-information unprotected tokens are
      kept (the paper's threshold γ_j, chosen here as the value that keeps exactly u_j). The unprotected budget
      U = B − P (P protected tokens) is shared out in proportion to each segment's unprotected tokens, so the
      kept count is exactly B.
Glossary: τ ``ratio`` · τ_ins / τ_que ``instruction_ratio`` / ``question_ratio`` · k ``granularity`` ·
          B budget in tokens · P protected tokens · U = B − P · u_j unprotected tokens kept from segment j.
Left out (simplified): the distribution alignment step (instruction-tuning the small LM on the large one's
outputs); the small and the target model are the same SmolLM2 in our chapter; the question is not used to
condition the demonstrations (that is LongLLMLingua's question-aware extension).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from effref.prompting.lm import token_information


def _check_ratio(ratio: float, name: str = "ratio") -> None:
    if not 0 < ratio <= 1:
        raise ValueError(f"{name}={ratio} must be in (0, 1]: the fraction of tokens to keep (0.5 halves the prompt)")


def budget(n_tokens: int, ratio: float) -> int:
    """Tokens kept from ``n_tokens`` at ``ratio``: ⌊ratio · n⌋ (never above the ratio), at least one of a
    non-empty text."""
    _check_ratio(ratio)
    return min(n_tokens, max(1, math.floor(ratio * n_tokens + 1e-9))) if n_tokens else 0


def select_tokens(scores: torch.Tensor, keep: int, protected: torch.Tensor | None = None) -> torch.Tensor:
    """Keep mask (T,): every protected token plus the ``keep − P`` unprotected tokens of highest score."""
    protected = torch.zeros_like(scores, dtype=torch.bool) if protected is None else protected
    n_protected = int(protected.sum())
    if n_protected > keep:
        raise ValueError(f"protected spans hold {n_protected} tokens but the budget is {keep}; raise the ratio "
                         "or protect less")
    if keep > scores.numel():
        raise ValueError(f"keep={keep} exceeds the {scores.numel()} tokens there are")
    ranked = torch.sort(scores.masked_fill(protected, float("-inf")), descending=True, stable=True).indices
    mask = protected.clone()
    mask[ranked[:keep - n_protected]] = True  # protected ones sort last, so these are all unprotected
    return mask


@torch.no_grad()
def compress_tokens(model, ids: torch.Tensor, ratio: float | None = None, protected: torch.Tensor | None = None,
                    segment_len: int = 64, prefix: torch.Tensor | None = None, keep: int | None = None
                    ) -> torch.Tensor:
    """Iterative token-level compression of ``ids`` (T,): a keep mask (T,) with exactly ``budget(T, ratio)``
    (or ``keep``) True.

    Each segment is scored by ``model`` after ``prefix`` (e.g. the compressed text before these ids) and the
    compressed segments so far. With no prefix the first token has no context; it is then kept first.
    """
    if (ratio is None) == (keep is None):
        raise ValueError("pass exactly one of ratio (a fraction in (0, 1]) and keep (a token count)")
    if ratio is not None:
        _check_ratio(ratio)
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"ids has shape {tuple(ids.shape)}; need a non-empty 1-D tensor of token ids")
    if segment_len < 1:
        raise ValueError(f"segment_len={segment_len} must be at least 1")
    protected = torch.zeros_like(ids, dtype=torch.bool) if protected is None else protected.to(ids.device)
    if protected.shape != ids.shape:
        raise ValueError(f"protected has shape {tuple(protected.shape)}; need one flag per token, {tuple(ids.shape)}")
    keep_total = budget(ids.numel(), ratio) if keep is None else keep
    if not 1 <= keep_total <= ids.numel():
        raise ValueError(f"keep={keep_total} must be between 1 and the {ids.numel()} tokens there are")
    n_protected = int(protected.sum())
    if n_protected > keep_total:
        asked = f"ratio={ratio}" if keep is None else f"keep={keep}"
        raise ValueError(f"protected spans hold {n_protected} tokens but {asked} keeps {keep_total} of "
                         f"{ids.numel()}; raise the ratio or protect less")
    free_total, unprotected_total = keep_total - n_protected, ids.numel() - n_protected
    context = ids.new_zeros(0) if prefix is None else prefix.to(ids.device)
    mask, free_cum, unprot_cum = torch.zeros_like(protected), 0, 0
    for start in range(0, ids.numel(), segment_len):
        seg = slice(start, start + segment_len)
        unprot_cum += int((~protected[seg]).sum())
        # u_j: the share of U that brings the kept unprotected count to U · (unprotected seen / all unprotected)
        target = round(free_total * unprot_cum / unprotected_total) if unprotected_total else 0
        seg_ids = ids[seg]
        full = torch.cat([context, seg_ids])  # (|context| + |segment|,)
        info = token_information(model, full) if full.numel() > 1 else full.new_zeros(0, dtype=torch.float)
        info = torch.cat([torch.full((full.numel() - info.numel(),), float("inf")), info.cpu()])
        seg_info = info[context.numel():]  # (|segment|,)
        keep = int(protected[seg].sum()) + target - free_cum
        mask[seg] = select_tokens(seg_info, keep, protected[seg].cpu()).to(mask.device)
        free_cum = target
        context = torch.cat([context, seg_ids[mask[seg]]])
    return mask


@dataclass
class CompressedPrompt:
    ids: list[int]
    text: str
    original_tokens: int
    kept_demonstrations: list[int]
    seconds: float

    @property
    def ratio(self) -> float:
        return len(self.ids) / self.original_tokens


def protected_mask(tokenizer, text: str, spans: Sequence[str]) -> tuple[list[int], torch.Tensor]:
    """Token ids of ``text`` and a mask (T,) of the tokens that overlap any occurrence of a string in ``spans``."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = torch.zeros(len(enc.input_ids), dtype=torch.bool)
    for span in spans:
        if not span:
            raise ValueError("an empty protected span; pass non-empty strings")
        at = text.find(span)
        while at >= 0:
            for t, (s, e) in enumerate(enc.offset_mapping):
                mask[t] |= s < at + len(span) and e > at
            at = text.find(span, at + 1)
    return enc.input_ids, mask


@torch.no_grad()
def compress_prompt(model, tokenizer, instruction: str, demonstrations: Sequence[str], question: str,
                    ratio: float, instruction_ratio: float = 1.0, question_ratio: float = 1.0,
                    granularity: float = 2.0, protect: Sequence[str] = (), segment_len: int = 64
                    ) -> CompressedPrompt:
    """LLMLingua: budget controller, coarse demonstration selection, then iterative token-level compression.

    The parts are joined as they are (put separators such as "\\n\\n" inside the demonstrations). Text in
    ``protect`` (e.g. the answer format or the options) is kept verbatim wherever it occurs.
    """
    _check_ratio(ratio)
    _check_ratio(instruction_ratio, "instruction_ratio")
    _check_ratio(question_ratio, "question_ratio")
    if granularity <= 0:
        raise ValueError(f"granularity={granularity} must be > 0 (the paper's k; 1 keeps about the budget)")
    start = time.perf_counter()
    device = model.embed.weight.device
    ins_ids, ins_prot = protected_mask(tokenizer, instruction, protect)
    que_ids, que_prot = protected_mask(tokenizer, question, protect)
    demos = [protected_mask(tokenizer, d, protect) for d in demonstrations]
    n_total = len(ins_ids) + len(que_ids) + sum(len(ids) for ids, _ in demos)
    if n_total == 0:
        raise ValueError("the prompt is empty; pass an instruction, demonstrations or a question")
    b_total = budget(n_total, ratio)
    b_ins, b_que = budget(len(ins_ids), instruction_ratio), budget(len(que_ids), question_ratio)
    b_dem = b_total - b_ins - b_que
    if b_dem < 0:
        raise ValueError(f"ratio={ratio} keeps {b_total} tokens, fewer than the instruction ({b_ins}) and question "
                         f"({b_que}) keep at their own ratios; lower instruction_ratio / question_ratio or raise ratio")
    # coarse: demonstrations by perplexity (mean information), highest first; protected ones always stay
    if sum(len(ids) for ids, _ in demos) <= granularity * b_dem:  # all fit: no need to rank them
        ppl = [0.0] * len(demos)
    else:
        ppl = [float(token_information(model, torch.tensor(ids, device=device)).mean()) if len(ids) > 1 else 0.0
               for ids, _ in demos]
    chosen, used = [], 0
    for i in sorted(range(len(demos)), key=lambda i: (not bool(demos[i][1].any()), -ppl[i])):
        if bool(demos[i][1].any()) or used + len(demos[i][0]) <= granularity * b_dem:
            chosen.append(i)
            used += len(demos[i][0])
    chosen.sort()
    dem_ids = [t for i in chosen for t in demos[i][0]]
    dem_prot = torch.cat([demos[i][1] for i in chosen]) if chosen else torch.zeros(0, dtype=torch.bool)
    # fine: each part compressed after the compressed parts before it
    kept = torch.zeros(0, dtype=torch.long, device=device)
    for ids, prot, keep in ((ins_ids, ins_prot, b_ins), (dem_ids, dem_prot, min(b_dem, len(dem_ids))),
                            (que_ids, que_prot, b_que)):
        if not ids or keep == 0:
            if int(prot.sum()):
                raise ValueError(f"protected spans hold {int(prot.sum())} tokens but this part's budget is 0; "
                                 "raise the ratio")
            continue
        ids_t = torch.tensor(ids, device=device)
        mask = compress_tokens(model, ids_t, keep=keep, protected=prot, segment_len=segment_len, prefix=kept)
        kept = torch.cat([kept, ids_t[mask]])
    out = kept.tolist()
    return CompressedPrompt(out, tokenizer.decode(out), n_total, chosen, time.perf_counter() - start)
