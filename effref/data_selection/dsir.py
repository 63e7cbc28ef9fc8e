"""DSIR: data selection for language models via importance resampling.

Paper: Xie, Santurkar, Ma, Liang (2023b), "Data Selection for Language Models via Importance Resampling",
arXiv:2302.03169 — §4 (hashed n-gram features, bag-of-ngrams models, importance weights, resampling).
Implements: each document x becomes the counts z ∈ ℕ^m of its word unigrams and bigrams hashed into m
buckets; one bag-of-ngrams distribution is fitted to the target texts (p̂) and one to the raw pool (q̂),
each the smoothed frequency of every bucket; a document's importance weight is the likelihood ratio

    w(x) = p̂(z) / q̂(z) = Π_j (γ_j / β_j)^{z_j},   log w(x) = z · (log γ − log β),

and k documents are resampled *without replacement* with probability ∝ w through Gumbel top-k.
Glossary: z = ``features`` (N, m) · m = ``num_buckets`` · γ, β = target and raw bucket probabilities
(``target_log_probs``, ``raw_log_probs``) · w = ``exp(log_weights)`` · k kept documents.
Simplified/left out: words are ``\\w+`` runs lowercased (the paper's tokenizer is unspecified beyond
"words"); the hash is CRC-32 (stable across processes, unlike Python's ``hash``); add-one smoothing; no
KL-reduction diagnostic; no streaming over terabytes (the pool is held in memory as a dense tensor).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import torch

from effref.data_selection.common import check_k, check_pool_size, gumbel_top_k

WORD = re.compile(r"\w+")


def ngram_bucket(ngram: str, num_buckets: int) -> int:
    """The bucket of one n-gram (words joined by a space): CRC-32 of its UTF-8 bytes modulo ``num_buckets``."""
    return zlib.crc32(ngram.encode("utf-8")) % num_buckets


def hashed_ngram_features(texts: list[str], num_buckets: int = 10_000, n: int = 2) -> torch.Tensor:
    """Counts of every text's hashed word 1…``n``-grams: (N, ``num_buckets``) float32."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    check_pool_size(len(texts), "list of texts")
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 1:
        raise ValueError(f"num_buckets={num_buckets!r} must be an integer ≥ 1, e.g. 10_000 as in the paper")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be an integer ≥ 1 (2 = unigrams and bigrams, as in the paper)")
    features = torch.zeros(len(texts), num_buckets)  # (N, m)
    for row, text in enumerate(texts):
        words = WORD.findall(text.lower())
        buckets = [ngram_bucket(" ".join(words[i:i + order]), num_buckets)
                   for order in range(1, n + 1) for i in range(len(words) - order + 1)]
        if buckets:
            features[row].index_add_(0, torch.tensor(buckets), torch.ones(len(buckets)))
    return features


def bag_of_ngrams_log_probs(features: torch.Tensor, smoothing: float = 1.0) -> torch.Tensor:
    """Log-probabilities of the buckets under the bag-of-ngrams model fitted to ``features``: (m,).

    Each bucket's probability is its total count plus ``smoothing``, normalized (add-``smoothing``).
    """
    if features.dim() != 2:
        raise ValueError(f"features must be (N, num_buckets), got shape {tuple(features.shape)}")
    check_pool_size(features.shape[0], "feature matrix")
    if smoothing <= 0:
        raise ValueError(f"smoothing={smoothing} must be > 0, or unseen buckets get probability 0")
    counts = features.double().sum(0) + smoothing  # (m,)
    return (counts / counts.sum()).log()


def importance_log_weights(features: torch.Tensor, target_log_probs: torch.Tensor,
                           raw_log_probs: torch.Tensor) -> torch.Tensor:
    """``log w(x) = z · (log γ − log β)`` for every row ``z`` of ``features``: (N,) float64."""
    if features.shape[-1] != target_log_probs.shape[0] or target_log_probs.shape != raw_log_probs.shape:
        raise ValueError(f"features {tuple(features.shape)}, target_log_probs {tuple(target_log_probs.shape)} "
                         f"and raw_log_probs {tuple(raw_log_probs.shape)} must share num_buckets")
    return features.double() @ (target_log_probs - raw_log_probs)  # (N,)


@dataclass(frozen=True)
class DSIRSelection:
    """The kept indices (in draw order) and every pool document's importance log-weight."""

    indices: torch.LongTensor  # (k,)
    log_weights: torch.Tensor  # (N,)


def dsir_select(raw_texts: list[str], target_texts: list[str], k: int, num_buckets: int = 10_000,
                n: int = 2, seed: int = 0) -> DSIRSelection:
    """Resample ``k`` of ``raw_texts`` so that their n-gram statistics resemble ``target_texts``.

    Fits the target and raw bag-of-ngrams models, weighs every raw document by their likelihood ratio
    and draws ``k`` documents without replacement ∝ weight (Gumbel top-k with ``seed``).
    """
    check_k(k, len(raw_texts), "pool of raw texts")
    check_pool_size(len(target_texts), "list of target texts")
    raw = hashed_ngram_features(raw_texts, num_buckets, n)  # (N, m)
    target = hashed_ngram_features(target_texts, num_buckets, n)  # (N_target, m)
    log_weights = importance_log_weights(raw, bag_of_ngrams_log_probs(target), bag_of_ngrams_log_probs(raw))
    return DSIRSelection(indices=gumbel_top_k(log_weights, k, seed), log_weights=log_weights)
