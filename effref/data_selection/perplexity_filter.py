"""Perplexity filtering: keep the documents a reference language model finds (most, or moderately) likely.

Papers: Wenzek, Lachaux, Conneau, Chaudhary, Guzmán, Joulin, Grave (2020), "CCNet", arXiv:1911.00359 — §3.3
(a 5-gram model trained on Wikipedia scores web text; the lowest-perplexity share is kept); Marion, Üstün,
Pozzobon, Wang, Fadaee, Hooker (2023), "When Less is More: Investigating Data Pruning for Pretraining LLMs
at Scale", arXiv:2309.04564 — §2 (perplexity of a reference model trained on a slice of the pool; keeping
the *middle* of the distribution works best there).
Implements: a document's perplexity under the reference model,

    PPL(x) = exp( −(1/|x|) Σ_t log p_ref(x_t | x_<t) ),

and the filter that keeps a fraction ``ratio`` of the pool with the lowest, the middle or the highest PPL.
Glossary: p_ref = ``model`` (a next-token model over bytes, e.g. ``TinyNextTokenLM``) · x_<t = the last
``model.context`` bytes (the model's whole context) · ratio ∈ (0, 1].
Simplified: the reference is our tiny next-byte model, not a 5-gram word model or a transformer; the first
``context`` bytes of a document are not scored (they have no full context).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from effref.data_selection.common import check_pool_size, k_from_ratio, top_k_indices
from effref.data_selection.proxy import text_bytes

KEEP = ("lowest", "middle", "highest")


@torch.no_grad()
def byte_perplexities(model: nn.Module, texts: list[str]) -> torch.Tensor:
    """Every text's perplexity per byte under ``model`` (inputs (B, C) → logits (B, 256)): (N,) float64."""
    check_pool_size(len(texts), "list of texts")
    context = model.context
    perplexities = []
    for text in texts:
        ids = text_bytes(text)  # (L,)
        if len(ids) <= context:
            raise ValueError(f"a text of {len(ids)} bytes is too short to score with context={context}; drop "
                             "texts shorter than the model's context + 1 bytes")
        windows = ids.unfold(0, context + 1, 1)  # (L-C, C+1)
        loss = F.cross_entropy(model(windows[:, :-1]), windows[:, -1])
        perplexities.append(loss.double().exp().item())
    return torch.tensor(perplexities, dtype=torch.float64)


def perplexity_filter(perplexities: torch.Tensor, ratio: float, keep: str = "lowest") -> torch.LongTensor:
    """Indices of the ``ratio`` share of documents with the ``keep`` (lowest/middle/highest) perplexities."""
    if perplexities.dim() != 1:
        raise ValueError(f"perplexities must be 1-D (one per document), got shape {tuple(perplexities.shape)}")
    if keep not in KEEP:
        raise ValueError(f"keep={keep!r} is not known; use one of {KEEP}")
    k = k_from_ratio(ratio, len(perplexities))
    if keep == "lowest":
        return top_k_indices(-perplexities, k)
    if keep == "highest":
        return top_k_indices(perplexities, k)
    order = torch.sort(perplexities, stable=True).indices  # (N,) ascending
    start = (len(perplexities) - k) // 2
    return order[start:start + k]
