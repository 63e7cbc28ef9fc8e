"""Shared pieces of the long-context tests: one thread (tiny models) and a factory of tiny random LLaMAs."""

from __future__ import annotations

import pytest
import torch

from effref.models.llama import Llama, LlamaConfig


@pytest.fixture(autouse=True, scope="module")
def _tiny_models_on_one_thread(one_thread):
    """Every test here runs models of a few thousand weights: one thread (tests/conftest.py)."""


def tiny_llama(seed: int = 0, **overrides) -> Llama:
    """A random LLaMA, 2 layers, d_head 8, its weights scaled up so that positions change the logits visibly."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                         "d_ff": 64, "max_seq_len": 64, **overrides})
    model = Llama(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10.0)
    return model


def random_ids(T: int, B: int = 2, vocab: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def make_llama():
    """The tiny_llama factory, for tests (a test module cannot import this conftest by name)."""
    return tiny_llama


@pytest.fixture
def make_ids():
    """The random_ids factory."""
    return random_ids
