"""Shared pieces of the inference tests: one thread (tiny models on a shared 2-core machine run faster and
steadier without thread hand-offs) and a factory of tiny random LLaMAs with peaked next-token distributions."""

from __future__ import annotations

import pytest
import torch

from effref.models.llama import Llama, LlamaConfig


@pytest.fixture(autouse=True, scope="module")
def _decode_on_one_thread(one_thread):
    """Every inference test decodes tiny models step by step: one thread (tests/conftest.py)."""


def _tiny_llama(seed: int = 0, n_layers: int = 3, vocab: int = 64, scale: float = 20.0, **overrides) -> Llama:
    """A random LLaMA whose weights are scaled up so that its argmax is rarely a near-tie."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{"vocab_size": vocab, "d_model": 32, "n_layers": n_layers, "n_heads": 4, "n_kv_heads": 2,
                         "d_ff": 64, "max_seq_len": 256, **overrides})
    model = Llama(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


@pytest.fixture
def tiny_llama():
    return _tiny_llama


@pytest.fixture
def random_ids():
    def make(B: int, T: int, vocab: int = 64, seed: int = 1) -> torch.Tensor:
        return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))
    return make
