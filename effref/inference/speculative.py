"""Speculative sampling: a cheap draft proposes γ tokens, the target checks them all in one forward pass.

Papers: Leviathan, Kalman, Matias (2023), "Fast Inference from Transformers via Speculative Decoding",
arXiv:2211.17192 — Algorithm 1, Eq. 1, Theorem 3.8; Chen, Borgeaud, Irving, Lespiau, Sifre, Jumper (2023),
"Accelerating Large Language Model Decoding with Speculative Sampling", arXiv:2302.01318 — Algorithm 2.
Implements: the draft samples x_i ~ q_i = q(· | prefix, x_<i) for i = 1..γ; the target computes p_1..p_γ+1 in
one pass over the prefix's last token and the drafts; left to right, draft i is accepted with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection the next token is drawn from norm(max(0, p_i − q_i)), and
if all γ are accepted a bonus token is drawn from p_γ+1. Each emitted token is distributed exactly as under
the target alone. Greedy variant (temperature 0): p and q are one-hot argmax vectors, so the same rule accepts
a draft iff it is the target's argmax and replaces it by that argmax: token-for-token greedy decoding.
Theory: if each draft is accepted with probability α = E[Σ_x min(p(x), q(x))], independently, a target call
yields (1 − α^(γ+1)) / (1 − α) tokens on average (Leviathan Eq. 1); with a draft costing c target calls the
wall-clock gain is that divided by (γc + 1) (Theorem 3.8).
Glossary: p target distribution · q draft distribution · γ ``gamma`` · α acceptance rate · β = Σ min(p, q) one
          position's overlap · n accepted drafts · c ``cost_ratio`` · T ``temperature``.
Top-k / top-p: ``token_probs`` applies the same filters to p and q, so the rule then reproduces the filtered
target (the serving engine's speculative sampling uses this, through ``Sampling``). Left out: batches here
(each sequence accepts a different n; effref.serving.Engine verifies a batch in one ragged pass), and
choosing γ from the cost model (the chapter sweeps it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from effref.inference.decoding import DecodeResult, check_generation
from effref.models.llama import KVCache, Llama, require_llama


@dataclass(frozen=True)
class SpeculativeConfig:
    gamma: int = 4  # γ draft tokens per target call
    temperature: float = 1.0  # 0: the greedy variant

    def __post_init__(self) -> None:
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, int) or self.gamma < 1:
            raise ValueError(f"gamma={self.gamma!r} draft tokens per step: need an integer >= 1 (e.g. 4); "
                             "gamma=0 would be plain decoding")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")


def token_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                top_p: float | None = None) -> torch.Tensor:
    """Next-token distribution(s) (..., V) in float32: softmax(logits / T), or one-hot argmax when T == 0.

    ``top_k`` keeps the k largest logits of each row (ties with the k-th included); ``top_p`` then keeps the
    smallest set of most likely tokens whose probability reaches p (nucleus sampling, Holtzman et al. 2020,
    arXiv:1904.09751); what is kept is renormalised. Bad values are refused as :class:`Sampling` refuses them.
    """
    Sampling(temperature, top_k, top_p)  # validates: a negative T would invert the distribution, top_p=0 give NaN
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits.float() / temperature  # (..., V)
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # (..., 1) k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)  # (..., V)
    if top_p is not None:
        sorted_probs, order = probs.sort(-1, descending=True)  # (..., V)
        before = sorted_probs.cumsum(-1) - sorted_probs  # (..., V) mass of the more likely tokens
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before >= top_p)  # never the first
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (``temperature`` 0), or sampled with optional top-k / top-p."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 = greedy)")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 1, or None to keep every token")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} must lie in (0, 1], or None to keep every token")

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution(s) (..., V) tokens are drawn from: ``token_probs`` with these settings."""
        return token_probs(logits, self.temperature, self.top_k, self.top_p)

    def draw(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> tuple[int, torch.Tensor]:
        """One token for ``logits`` (V,), and the distribution (V,) on the CPU it was drawn from (the argmax
        when greedy). Draws on the CPU, so ``generator`` is a CPU generator."""
        q = self.probs(logits).cpu()  # (V,)
        token = int(q.argmax()) if self.temperature == 0 else int(torch.multinomial(q, 1, generator=generator))
        return token, q


def expected_tokens_per_call(alpha: float, gamma: int) -> float:
    """Leviathan Eq. 1: E[tokens per target call] = (1 − α^(γ+1)) / (1 − α)."""
    return gamma + 1.0 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def expected_speedup(alpha: float, gamma: int, cost_ratio: float) -> float:
    """Leviathan Theorem 3.8: wall-clock improvement when one draft call costs ``cost_ratio`` target calls."""
    return expected_tokens_per_call(alpha, gamma) / (gamma * cost_ratio + 1)


def speculative_verify(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[int, int]:
    """Accept a prefix of the drafts and choose the next token: returns (n accepted, next token).

    ``p`` (γ+1, V) target and ``q`` (γ, V) draft probabilities at the drafted positions, ``drafted`` (γ,).
    """
    gamma = drafted.numel()
    if p.ndim != 2 or q.shape != (gamma, p.shape[1]) or p.shape[0] != gamma + 1:
        raise ValueError(f"p {tuple(p.shape)}, q {tuple(q.shape)}, drafted ({gamma},): need p (γ+1, V), "
                         "q (γ, V) with the same vocabulary V")
    p, q, drafted = p.cpu(), q.cpu(), drafted.cpu()
    rows = torch.arange(gamma)
    ratio = p[rows, drafted] / q[rows, drafted]  # (γ,) p_i(x_i) / q_i(x_i); q > 0 where x_i was drawn
    u = torch.rand(gamma, generator=generator)  # (γ,) one uniform per draft
    rejected = (u >= ratio).nonzero()  # accept draft i iff u_i < p_i(x_i) / q_i(x_i)
    n = int(rejected[0]) if len(rejected) else gamma
    residual = p[gamma] if n == gamma else (p[n] - q[n]).clamp_min(0)  # norm(max(0, p − q)); bonus: p_γ+1
    if not residual.sum() > 0:  # p == q: a rejection had probability 0, any draw from p is right
        residual = p[n]
    return n, int(torch.multinomial(residual, 1, generator=generator))


@dataclass
class SpeculativeState:
    """One sequence: committed tokens, the target cache (all of them but the last) and the draft cache (a prefix)."""

    tokens: list[int]
    target_cache: KVCache
    draft_cache: KVCache


def draft_tokens(draft: Llama, tokens: list[int], cache: KVCache, n: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None, min_confidence: float = 0.0,
                 ) -> tuple[list[int], torch.Tensor, int]:
    """Draft up to ``n`` tokens after ``tokens`` (the cache holds a prefix of them; the rest are fed first).

    Stops early when the draft's top probability falls below ``min_confidence`` (BiLD's fallback). Returns the
    drafts, their distributions q (n', V) on the CPU and the number of draft forward calls. ``generator`` is a
    CPU generator (``Sampling.draw``).
    """
    drafted, rows, calls, sampling = [], [], 0, Sampling(temperature)
    feed = tokens[cache.length:]
    for _ in range(n):
        logits = draft(torch.tensor([feed], device=cache.k[0].device), cache)[0, -1]  # (V,)
        calls += 1
        if min_confidence > 0 and float(logits.float().softmax(-1).max()) < min_confidence:
            break
        x, q = sampling.draw(logits, generator)  # q (V,)
        drafted.append(x)
        rows.append(q)
        feed = [x]
    return drafted, torch.stack(rows) if rows else torch.zeros(0, 0), calls


def speculative_step(target: Llama, draft: Llama, state: SpeculativeState, config: SpeculativeConfig,
                     generator: torch.Generator | None = None) -> tuple[list[int], int, torch.Tensor]:
    """One draft-then-verify round on ``state``: returns (new tokens, draft calls, overlaps β per draft)."""
    drafted, q, calls = draft_tokens(draft, state.tokens, state.draft_cache, config.gamma, config.temperature,
                                     generator)
    feed = state.tokens[state.target_cache.length:] + drafted  # the pending token (or prompt), then drafts
    logits = target(torch.tensor([feed], device=state.target_cache.k[0].device), state.target_cache)
    p = token_probs(logits[0, -(config.gamma + 1):], config.temperature).cpu()  # (γ+1, V)
    n, token = speculative_verify(p, q, torch.tensor(drafted), generator)
    kept = len(state.tokens) + n  # committed tokens + accepted drafts; ``token`` becomes the pending one
    state.target_cache.truncate(kept)
    state.draft_cache.truncate(min(state.draft_cache.length, kept))
    state.tokens += drafted[:n] + [token]
    return drafted[:n] + [token], calls, p[:-1].minimum(q).sum(-1)  # β_i = Σ_x min(p_i, q_i)


@dataclass
class SpeculativeResult(DecodeResult):
    overlaps: list[float] = field(default_factory=list)  # β at every drafted position

    @property
    def alpha(self) -> float:
        """Estimated acceptance rate α = mean β (Leviathan §3.1)."""
        return sum(self.overlaps) / max(len(self.overlaps), 1)


def check_pair(target: Llama, draft: Llama) -> None:
    require_llama(target, "target")
    require_llama(draft, "draft")
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ValueError(f"draft vocab_size={draft.cfg.vocab_size} differs from target vocab_size="
                         f"{target.cfg.vocab_size}; speculative decoding needs a draft with the same tokenizer")


def speculative_loop(target: Llama, draft: Llama, prompt: torch.Tensor, max_new_tokens: int,
                     step: Callable[[SpeculativeState], tuple[list[int], int, int, torch.Tensor]], margin: int,
                     eos_id: int | None = None) -> SpeculativeResult:
    """Run ``step(state) -> (new tokens, draft calls, drafts proposed, overlaps)`` until enough tokens exist.

    Shared by speculative sampling and BiLD; ``margin`` is the most tokens one step writes past the output.
    """
    check_pair(target, draft)
    check_generation(target, prompt, max_new_tokens, margin=margin)
    start, length = time.perf_counter(), prompt.shape[1] + max_new_tokens + margin
    state = SpeculativeState(prompt[0].tolist(), target.new_cache(1, length), draft.new_cache(1, length))
    if prompt.shape[1] > 1:
        target(prompt[:, :-1], state.target_cache)  # prefill all but the last token, which the first step feeds
    result, end = SpeculativeResult(prompt, prompt.shape[1]), prompt.shape[1] + max_new_tokens
    while len(state.tokens) < end and not (eos_id is not None and eos_id in state.tokens[prompt.shape[1]:]):
        new, calls, proposed, overlaps = step(state)
        result.emitted.append(len(new))
        result.proposed.append(proposed)
        result.overlaps += overlaps.tolist()
        result.draft_calls += calls
    new = state.tokens[prompt.shape[1]:end]
    if eos_id is not None and eos_id in new:
        new = new[:new.index(eos_id) + 1]
    result.tokens = torch.cat([prompt, torch.tensor([new], device=prompt.device)], dim=1)
    result.wall_s = time.perf_counter() - start
    return result


@torch.no_grad()
def speculative_generate(target: Llama, draft: Llama, prompt: torch.Tensor, max_new_tokens: int,
                         config: SpeculativeConfig = SpeculativeConfig(),
                         generator: torch.Generator | None = None, eos_id: int | None = None) -> SpeculativeResult:
    """Sample ``max_new_tokens`` tokens from ``target`` (temperature ``config.temperature``) using ``draft``."""

    def step(state: SpeculativeState) -> tuple[list[int], int, int, torch.Tensor]:
        new, calls, overlaps = speculative_step(target, draft, state, config, generator)
        return new, calls, config.gamma, overlaps

    return speculative_loop(target, draft, prompt, max_new_tokens, step, config.gamma + 1, eos_id)
