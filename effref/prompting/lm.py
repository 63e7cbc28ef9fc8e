"""Shared machinery of the prompting modules: what they ask of a causal language model.

Every prompting method here talks to the model through four small calls, written once:

- ``hidden_states(model, ids)``: the final-norm hidden states of our ``Llama`` (B, T, d_model);
  ``embed_texts`` mean-pools them into one vector per text — the embedding KATE and Vote-k search in.
- ``forward_embeds(model, embeds, mask)``: the ``Llama`` forward from input *embeddings* under any boolean
  attention mask (True = may attend). Gist tokens need the mask, AutoPrompt needs gradients with respect to the
  inputs; with ``mask=None`` it is the causal forward and equals ``model(ids)`` (tested). ``run_layers`` is the
  same forward that also continues after cached keys/values and returns them (gist tokens' compressed cache).
- ``token_information(model, ids)``: the self-information −log p(x_t | x_<t) of every token (LLMLingua's score).
- ``choice_logprobs(model, prompts, choices)``: the log-probability of each single-token answer after each
  prompt, prompts right-padded into one batch (a causal model never looks right, so padding is harmless).

Glossary: B batch · T new tokens · S keys (cached + new) · d_model hidden size · V vocabulary · mask (T, S) or (B, T, S), True = attend.
Left out: padding masks for left-padded batches (we pad on the right and read each row at its own last token).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from effref.models.llama import Llama, apply_rope, require_llama

KV = tuple[torch.Tensor, torch.Tensor]  # one layer's (keys, values), each (B, n_kv_heads, S, d_head)


def _attend(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
            past: KV | None) -> tuple[torch.Tensor, KV]:
    """One attention layer of our Llama under an explicit boolean mask (B or 1, 1, T, S), after ``past`` keys."""
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.n_heads, attn.d_head).transpose(1, 2)  # (B, n_heads, T, d_head)
    k = attn.k_proj(x).view(B, T, attn.n_kv_heads, attn.d_head).transpose(1, 2)  # (B, n_kv, T, d_head)
    v = attn.v_proj(x).view(B, T, attn.n_kv_heads, attn.d_head).transpose(1, 2)  # (B, n_kv, T, d_head)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, n_kv, S, d_head)
    groups = attn.n_heads // attn.n_kv_heads
    kk, vv = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, n_heads, S, d_head)
    y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)  # (B, n_heads, T, d_head)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, attn.n_heads * attn.d_head)), (k, v)  # (B, T, d_model)


def run_layers(model: Llama, embeds: torch.Tensor, mask: torch.Tensor | None = None,
               past: list[KV] | None = None, offset: int = 0) -> tuple[torch.Tensor, list[KV]]:
    """Final-norm hidden states (B, T, d_model) and every layer's keys/values (past ones included).

    ``embeds`` (B, T, d_model) sit at positions offset .. offset + T − 1, after ``past`` (S − T cached keys per
    layer, for the same batch). ``mask`` is (T, S) or (B, T, S), True where query i may attend to key j;
    ``None`` is causal over past + new.
    """
    require_llama(model)
    if embeds.dim() != 3 or embeds.shape[-1] != model.cfg.d_model:
        raise ValueError(f"embeds has shape {tuple(embeds.shape)}; need (B, T, d_model={model.cfg.d_model})")
    T = embeds.shape[1]
    P = 0 if past is None else past[0][0].shape[2]
    if offset + T > model.cfg.max_seq_len:
        raise ValueError(f"positions up to {offset + T} exceed max_seq_len={model.cfg.max_seq_len}; shorten "
                         "the input")
    S = P + T
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=embeds.device).tril(diagonal=P)  # (T, S)
    if mask.dtype != torch.bool or mask.shape[-2:] != (T, S) or mask.dim() not in (2, 3):
        raise ValueError(f"mask must be a bool tensor of shape (T, S) or (B, T, S) with T={T}, S={S}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    mask = mask.view(-1, 1, T, S)  # (B or 1, 1, T, S): the same for every head
    cos, sin = model.rope_cos[offset:offset + T], model.rope_sin[offset:offset + T]  # (T, d_head) each
    x, kvs = embeds, []
    for layer, block in enumerate(model.blocks):
        h, kv = _attend(block.attn, block.attn_norm(x), cos, sin, mask, None if past is None else past[layer])
        x = x + h  # (B, T, d_model)
        x = x + block.mlp(block.mlp_norm(x))  # (B, T, d_model)
        kvs.append(kv)
    return model.norm(x), kvs  # (B, T, d_model)


def forward_embeds(model: Llama, embeds: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, V) of our ``Llama`` for input embeddings (B, T, d_model) under a boolean ``mask``.

    ``mask`` is (T, T) or (B, T, T), True where query row i may attend to key column j; ``None`` is causal.
    """
    return model.lm_head(run_layers(model, embeds, mask)[0])  # (B, T, V)


def hidden_states(model: Llama, ids: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states (B, T, d_model) of our ``Llama`` for token ids (B, T)."""
    require_llama(model)
    return run_layers(model, model.embed(ids))[0]


@torch.no_grad()
def embed_texts(model: Llama, tokenizer, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """One vector per text (N, d_model): the model's final hidden states, mean-pooled over the text's tokens.

    Texts are right-padded into batches; a causal model's states at real tokens never see the padding, and
    the mean runs over the real tokens only."""
    if len(texts) == 0:
        raise ValueError("texts is empty; pass at least one text to embed")
    token_lists = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    if any(len(ids) == 0 for ids in token_lists):
        empty = next(t for t, ids in zip(texts, token_lists) if not ids)
        raise ValueError(f"text {empty!r} has no tokens; drop empty texts before embedding")
    device = model.embed.weight.device
    rows = []
    for start in range(0, len(token_lists), batch_size):
        chunk = token_lists[start:start + batch_size]
        T = max(len(ids) for ids in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long, device=device)  # (b, T), right-padded
        real = torch.zeros(len(chunk), T, 1, device=device)  # (b, T, 1): 1 at real tokens
        for row, tokens in enumerate(chunk):
            ids[row, :len(tokens)] = torch.tensor(tokens)
            real[row, :len(tokens)] = 1.0
        states = hidden_states(model, ids)  # (b, T, d_model)
        rows.append((states * real).sum(1) / real.sum(1))  # (b, d_model)
    return torch.cat(rows)  # (N, d_model)


@torch.no_grad()
def token_information(model: Llama, ids: torch.Tensor) -> torch.Tensor:
    """Self-information −log p(x_t | x_<t) in nats of every token of ``ids`` (T,) after the first; (T − 1,)."""
    require_llama(model)
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"ids has shape {tuple(ids.shape)}; need a 1-D tensor of at least 2 token ids")
    logp = model(ids[None]).log_softmax(-1)[0, :-1]  # (T − 1, V): the prediction of token t + 1
    return -logp.gather(1, ids[1:, None])[:, 0]  # (T − 1,)


@torch.no_grad()
def choice_logprobs(model: Llama, prompts: Sequence[Sequence[int]], choices: Sequence[int],
                    pad_id: int = 0, batch_size: int = 8) -> torch.Tensor:
    """log p(choice | prompt) for every prompt and single-token choice, (N, C); prompts right-padded in batches."""
    require_llama(model)
    if len(prompts) == 0 or len(choices) == 0:
        raise ValueError(f"got {len(prompts)} prompts and {len(choices)} choices; need at least one of each")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt has no tokens; every prompt needs at least one token")
    device = model.embed.weight.device
    choice_ids = torch.tensor(list(choices), device=device)  # (C,)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        T = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long, device=device)  # (b, T)
        for row, p in enumerate(chunk):
            ids[row, :len(p)] = torch.as_tensor(list(p))
        last = torch.tensor([len(p) - 1 for p in chunk], device=device)  # (b,)
        logits = model(ids)[torch.arange(len(chunk), device=device), last]  # (b, V)
        out.append(logits.log_softmax(-1)[:, choice_ids])  # (b, C)
    return torch.cat(out)  # (N, C)
