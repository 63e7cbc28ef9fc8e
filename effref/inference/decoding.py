"""Draft-and-verify decoding: one target pass checks many proposed tokens, arranged as a tree.

Papers: Miao et al. (2023), "SpecInfer", arXiv:2305.09781 — §4 (tree attention with a topology-aware causal
mask, and verification); the same mechanism serves Medusa (Cai et al. 2024, arXiv:2401.10774), LLMA (Yang et
al. 2023, arXiv:2304.04487) and Lookahead decoding (Fu et al. 2024, arXiv:2402.02057).
Implements:
  a token tree as a parent list: node 0 is the root (the last committed token), parents[i] < i;
  the tree mask  M[i, j] = 1  iff node j is node i or one of its ancestors, so each node attends to the cached
  prefix and to its own root-to-node path, exactly as if that path were the whole continuation;
  RoPE positions  base + depth(i)  (siblings share a position);
  greedy verification: from the root, follow the child whose token equals the target's argmax at the current
  node; the accepted path plus the target's argmax at its last node (the "bonus" token) is exactly what
  token-by-token greedy decoding produces;
  moving the accepted path's keys/values into consecutive cache slots; one round of all that is ``tree_step``
  (what a serving engine would call per sequence), and ``tree_generate`` loops it for every greedy
  draft-and-verify scheme of this package (only the proposer differs).
Glossary: T tree nodes in one pass · R keys the mask covers (the last R of S) · base position of the root
          · path accepted node indices (path[0] = 0) · bonus the target's argmax after the path
          · history every committed token; the cache holds all of it but the last ("pending") one.
Left out: batches of sequences (each accepts a different number of tokens: the serving engine's job) and
          stochastic tree verification (SpecInfer's multi-step speculative sampling).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from effref.models.llama import KVCache, Llama, apply_rope, require_llama


@dataclass
class DecodeResult:
    """Output and bookkeeping of one accelerated generation (batch 1)."""

    tokens: torch.Tensor  # (1, prompt + new)
    prompt_len: int
    emitted: list[int] = field(default_factory=list)  # tokens each target call (after prefill) produced
    proposed: list[int] = field(default_factory=list)  # draft tokens each target call checked
    draft_calls: int = 0  # forward passes of a draft model, if any
    wall_s: float = 0.0

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.tokens[0, self.prompt_len:]  # (new,)

    @property
    def target_calls(self) -> int:
        return len(self.emitted)  # decoding passes of the target, the prefill not counted

    @property
    def tokens_per_call(self) -> float:
        return sum(self.emitted) / max(len(self.emitted), 1)

    def describe(self) -> str:
        return (f"{len(self.new_tokens)} new tokens in {self.target_calls} target calls "
                f"({self.tokens_per_call:.2f} tokens/call), {self.draft_calls} draft calls, {self.wall_s:.2f} s")


def check_generation(model: Llama, prompt: torch.Tensor, max_new_tokens: int, margin: int = 0) -> None:
    """Validate a batch-1 prompt and a token budget against the model's context length."""
    require_llama(model, "model")
    if prompt.ndim != 2 or prompt.shape[0] != 1 or prompt.shape[1] < 1 or prompt.is_floating_point():
        raise ValueError(f"prompt must be integer token ids of shape (1, T) with T >= 1, got "
                         f"{tuple(prompt.shape)} {prompt.dtype}; these decoders run one sequence at a time")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    need = prompt.shape[1] + max_new_tokens + margin
    if need > model.cfg.max_seq_len:
        raise ValueError(f"prompt {prompt.shape[1]} + max_new_tokens={max_new_tokens} + {margin} speculative "
                         f"slots = {need} exceeds max_seq_len={model.cfg.max_seq_len}; ask for fewer tokens")


def check_parents(parents: list[int]) -> None:
    if not parents or parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(parents) if i):
        raise ValueError(f"parents={parents} is not a token tree: need parents[0] == -1 (the root) and "
                         "0 <= parents[i] < i for every other node (nodes listed parents first)")


def tree_mask(parents: list[int]) -> torch.Tensor:
    """M (T, T) bool with M[i, j] = True iff node j is node i or an ancestor of it."""
    check_parents(parents)
    mask = torch.eye(len(parents), dtype=torch.bool)  # (T, T): every node sees itself
    for i, p in enumerate(parents[1:], start=1):
        mask[i] |= mask[p]  # ... and everything its parent sees
    return mask


def tree_depths(parents: list[int]) -> torch.Tensor:
    """Depth of every node, (T,) long; the root has depth 0."""
    check_parents(parents)
    depth = [0] * len(parents)
    for i, p in enumerate(parents[1:], start=1):
        depth[i] = depth[p] + 1
    return torch.tensor(depth)


def _masked_attention(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                      mask: torch.Tensor | None) -> torch.Tensor:
    """Our Llama's attention (same weights, same cache protocol) with a mask over the last R keys."""
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.n_heads, attn.d_head).transpose(1, 2)  # (B, n_heads, T, d_head)
    k = attn.k_proj(x).view(B, T, attn.n_kv_heads, attn.d_head).transpose(1, 2)  # (B, n_kv, T, d_head)
    v = attn.v_proj(x).view(B, T, attn.n_kv_heads, attn.d_head).transpose(1, 2)  # (B, n_kv, T, d_head)
    k, v = cache.update(attn.layer, apply_rope(k, cos, sin), v)  # (B, n_kv, S, d_head)
    S, groups = k.shape[2], attn.n_heads // attn.n_kv_heads
    visible = torch.ones(T, S, dtype=torch.bool, device=x.device)  # (T, S): the cached prefix is visible
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # a chain: plain causal
    visible[:, S - mask.shape[1]:] = mask
    y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), k.repeat_interleave(groups, dim=1),
                                       v.repeat_interleave(groups, dim=1), attn_mask=visible)  # (B, n_heads, T, d)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, attn.n_heads * attn.d_head))  # (B, T, d_model)


def forward_tokens(model: Llama, ids: torch.Tensor, cache: KVCache, positions: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, layers: Sequence[int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, T, V) and final hidden states (B, T, d_model) of T tokens appended to ``cache``.

    ``positions`` (T,) are the RoPE positions (default: consecutive after the cache); ``mask`` (T, R) bool says
    which of the last R keys (the new tokens are the last T of them) each new token may see; keys before those
    R are always visible. Without ``mask`` the new tokens form a causal chain, as in ``Llama.forward``.
    ``layers`` (default: all) lists the blocks to run; the others are skipped (SkipDecode).
    """
    T = ids.shape[1]
    if positions is None:
        positions = torch.arange(cache.length, cache.length + T)
    if positions.shape != (T,) or (mask is not None and (mask.ndim != 2 or mask.shape[0] != T
                                                         or not T <= mask.shape[1] <= cache.length + T)):
        raise ValueError(f"positions {tuple(positions.shape)} and mask "
                         f"{None if mask is None else tuple(mask.shape)} must be (T,) and (T, R >= T), T={T}")
    positions = positions.to(model.rope_cos.device)
    cos, sin = model.rope_cos[positions], model.rope_sin[positions]  # (T, d_head) each
    mask = None if mask is None else mask.to(ids.device)
    x = model.embed(ids)  # (B, T, d_model)
    for block in model.blocks if layers is None else [model.blocks[i] for i in layers]:
        x = x + _masked_attention(block.attn, block.attn_norm(x), cos, sin, cache, mask)
        x = x + block.mlp(block.mlp_norm(x))  # (B, T, d_model)
    cache.advance(T)
    hidden = model.norm(x)  # (B, T, d_model)
    return model.lm_head(hidden), hidden


def verify_tree_greedy(tokens: list[int], parents: list[int], predicted: list[int]) -> list[int]:
    """The accepted path (node indices from the root) given the target's argmax ``predicted`` at every node."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents[1:], start=1):
        children.setdefault(p, []).append(i)
    path = [0]
    while True:
        follow = [c for c in children.get(path[-1], []) if tokens[c] == predicted[path[-1]]]
        if not follow:
            return path
        path.append(follow[0])  # duplicates of a token among siblings are equivalent; take the first


def commit_path(cache: KVCache, base: int, path: list[int]) -> None:
    """Keep only the accepted ``path`` of a tree written at ``base``: move its keys/values to base, base+1, …"""
    if path != list(range(len(path))):  # a chain prefix is already in place
        index = torch.tensor(path, device=cache.k[0].device) + base
        for buffer in cache.k + cache.v:
            buffer[:, :, base:base + len(path)] = buffer[:, :, index]  # (B, n_kv, len(path), d_head), copied
    cache.truncate(base + len(path))


class TreeProposer:
    """Proposes a token tree rooted at the pending token; subclasses implement ``propose``."""

    max_nodes: int = 1  # the largest tree ``propose`` returns (sizes the cache)
    draft_calls: int = 0

    def propose(self, history: list[int], hidden: torch.Tensor) -> tuple[list[int], list[int]]:
        """Tokens and parents of a tree whose root, tokens[0], is ``history[-1]``; ``hidden`` (d_model,) is the
        target's final hidden state at the position that predicted that root."""
        return [history[-1]], [-1]

    def observe(self, tokens: list[int], parents: list[int], predicted: list[int], path: list[int]) -> None:
        """Called after verification with the target's argmax at every node (Lookahead learns from it)."""


@torch.no_grad()
def tree_step(model: Llama, cache: KVCache, history: list[int], hidden: torch.Tensor,
              proposer: TreeProposer) -> tuple[list[int], torch.Tensor, int]:
    """One propose-verify-commit round: appends the new tokens to ``history`` (whose last token is pending,
    i.e. not yet in ``cache``) and returns them, the hidden state that predicted the new pending token, and
    the number of proposed tokens. A serving engine can call this per sequence and iteration."""
    tokens, parents = proposer.propose(history, hidden)
    if tokens[0] != history[-1] or len(tokens) != len(parents) or len(tokens) > proposer.max_nodes:
        raise ValueError(f"{type(proposer).__name__} proposed {len(tokens)} tokens / {len(parents)} parents rooted "
                         f"at {tokens[0]}; need the pending token {history[-1]} as root and at most "
                         f"max_nodes={proposer.max_nodes} nodes")
    base = cache.length
    ids = torch.tensor([tokens], device=hidden.device)  # (1, T)
    logits, hid = forward_tokens(model, ids, cache, base + tree_depths(parents), tree_mask(parents))
    predicted = logits[0].argmax(-1).tolist()  # (T,) the target's greedy choice after every node
    path = verify_tree_greedy(tokens, parents, predicted)
    commit_path(cache, base, path)
    proposer.observe(tokens, parents, predicted, path)
    new = [tokens[i] for i in path[1:]] + [predicted[path[-1]]]
    history += new
    return new, hid[0, path[-1]], len(tokens) - 1  # (d_model,) hidden state at the last accepted node


@torch.no_grad()
def tree_generate(model: Llama, prompt: torch.Tensor, max_new_tokens: int, proposer: TreeProposer,
                  eos_id: int | None = None) -> DecodeResult:
    """Greedy decoding accelerated by ``proposer``: output identical to ``model.generate(prompt, n)``."""
    check_generation(model, prompt, max_new_tokens)
    start = time.perf_counter()
    cache = model.new_cache(1, min(model.cfg.max_seq_len, prompt.shape[1] + max_new_tokens + proposer.max_nodes))
    logits, hidden = forward_tokens(model, prompt, cache)  # prefill: (1, T, V), (1, T, d)
    history = prompt[0].tolist() + [int(logits[0, -1].argmax())]
    hidden, result = hidden[0, -1], DecodeResult(prompt, prompt.shape[1])
    end = prompt.shape[1] + max_new_tokens
    while len(history) < end and not (eos_id is not None and eos_id in history[prompt.shape[1]:]):
        new, hidden, proposed = tree_step(model, cache, history, hidden, proposer)
        result.emitted.append(len(new))
        result.proposed.append(proposed)
    new = history[prompt.shape[1]:end]
    if eos_id is not None and eos_id in new:
        new = new[:new.index(eos_id) + 1]
    result.tokens = torch.cat([prompt, torch.tensor([new], device=prompt.device)], dim=1)
    result.draft_calls, result.wall_s = proposer.draft_calls, time.perf_counter() - start
    return result
