"""Gist tokens: learn to compress a prompt into the keys and values of a few extra tokens.

Paper: Mu, Li, Goodman (2023), "Learning to Compress Prompts with Gist Tokens", NeurIPS, arXiv:2304.08467 —
§2 (gisting), §3 (the gist mask for decoder-only models, their Figure 2).
Implements: the sequence [prompt t (P tokens)] [G gist tokens] [rest x (input and answer)] is trained with the
ordinary next-token loss on the answer, under the causal mask with one block removed: no position after the
gist tokens may attend to the prompt,
    M[i, j] = 1[j ≤ i] · ¬(i ≥ P + G  ∧  j < P).
Whatever the rest needs from the prompt must therefore pass through the gist tokens' keys and values. At
inference the prompt is run once with the gist tokens after it, only the G gist positions' keys/values are kept
(``gist_cache``), and every later request continues from them (``continue_after``): the prompt's P cached
positions shrink to G.
Glossary: t prompt · G ``n_gist`` · P prompt length · x rest · M ``gist_mask`` (True = may attend) · gist
          embeddings g_1..g_G (``GistTokens.embeddings``, trained like a new vocabulary entry).
Left out (simplified): the paper fine-tunes LLaMA-7B / FLAN-T5 on Alpaca+ instructions; we train a small model
(and the gist embeddings) on a synthetic task; batches share one prompt length (no padding).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from effref.models.llama import Llama, require_llama
from effref.prompting.lm import KV, run_layers


def gist_mask(prompt_len: int, n_gist: int, rest_len: int, device=None) -> torch.Tensor:
    """The gist mask (T, T), T = prompt_len + n_gist + rest_len: causal, and the rest cannot see the prompt."""
    if prompt_len < 1 or n_gist < 1 or rest_len < 0:
        raise ValueError(f"prompt_len={prompt_len}, n_gist={n_gist}, rest_len={rest_len}: need a prompt and at "
                         "least one gist token (rest_len >= 0)")
    T = prompt_len + n_gist + rest_len
    mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T): j <= i
    mask[prompt_len + n_gist:, :prompt_len] = False  # the rest never sees the prompt
    return mask


class GistTokens(nn.Module):
    """G trainable gist embeddings, initialised at the mean of the model's token embeddings (plus a little noise)."""

    def __init__(self, model: Llama, n_gist: int, seed: int = 0):
        super().__init__()
        require_llama(model)
        if n_gist < 1:
            raise ValueError(f"n_gist={n_gist} must be at least 1")
        weight = model.embed.weight.detach()
        noise = torch.randn(n_gist, weight.shape[1], generator=torch.Generator().manual_seed(seed))
        self.embeddings = nn.Parameter(weight.mean(0) + 0.02 * noise.to(weight))  # (G, d_model)

    @property
    def n_gist(self) -> int:
        return self.embeddings.shape[0]


def _inputs(model: Llama, gist: GistTokens, prompt: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    if prompt.dim() != 2 or rest.dim() != 2 or prompt.shape[0] != rest.shape[0]:
        raise ValueError(f"prompt {tuple(prompt.shape)} and rest {tuple(rest.shape)} must be (B, P) and (B, R) "
                         "with the same B")
    B = prompt.shape[0]
    g = gist.embeddings[None].expand(B, -1, -1)  # (B, G, d_model)
    return torch.cat([model.embed(prompt), g, model.embed(rest)], dim=1)  # (B, P + G + R, d_model)


def gist_logits(model: Llama, gist: GistTokens, prompt: torch.Tensor, rest: torch.Tensor,
                masked: bool = True) -> torch.Tensor:
    """Logits (B, R, V) at the rest positions of [prompt, gist, rest] under the gist mask (or causal if not)."""
    embeds = _inputs(model, gist, prompt, rest)
    P, G, R = prompt.shape[1], gist.n_gist, rest.shape[1]
    mask = gist_mask(P, G, R, prompt.device) if masked else None
    return model.lm_head(run_layers(model, embeds, mask)[0][:, P + G:])  # (B, R, V)


def gist_loss(model: Llama, gist: GistTokens, prompt: torch.Tensor, rest: torch.Tensor,
              loss_mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the rest tokens flagged in ``loss_mask`` (B, R), under the gist mask.

    Rest token r is predicted from the position before it (the last gist token for r = 0)."""
    embeds = _inputs(model, gist, prompt, rest)
    P, G, R = prompt.shape[1], gist.n_gist, rest.shape[1]
    hidden = run_layers(model, embeds, gist_mask(P, G, R, prompt.device))[0]  # (B, T, d_model)
    logits = model.lm_head(hidden[:, P + G - 1:-1])  # (B, R, V): the predictions of rest[0 .. R − 1]
    losses = F.cross_entropy(logits.transpose(1, 2), rest, reduction="none")  # (B, R)
    return (losses * loss_mask).sum() / loss_mask.sum().clamp_min(1)


def train_gist(model: Llama, gist: GistTokens, batches: Callable[[int], tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]],
               steps: int, lr: float = 3e-3, train_model: bool = True) -> list[float]:
    """Train the gist embeddings (and the model, as the paper does, when ``train_model``) for ``steps`` steps.

    ``batches(step)`` returns (prompt (B, P), rest (B, R), loss_mask (B, R)). Returns the loss of every step.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    params = list(gist.parameters()) + (list(model.parameters()) if train_model else [])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        loss = gist_loss(model, gist, *batches(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def gist_cache(model: Llama, gist: GistTokens, prompt: torch.Tensor) -> list[KV]:
    """Run [prompt, gist] once and keep only the gist positions' keys and values: (B, n_kv, G, d_head) per layer."""
    embeds = _inputs(model, gist, prompt, prompt[:, :0])
    P = prompt.shape[1]
    _, kvs = run_layers(model, embeds)
    return [(k[:, :, P:], v[:, :, P:]) for k, v in kvs]


@torch.no_grad()
def continue_after(model: Llama, cache: list[KV], prompt_len: int, rest: torch.Tensor) -> torch.Tensor:
    """Logits (B, R, V) of ``rest`` continuing from a gist cache; positions resume after prompt and gist."""
    G = cache[0][0].shape[2]
    return model.lm_head(run_layers(model, model.embed(rest), past=cache, offset=prompt_len + G)[0])
