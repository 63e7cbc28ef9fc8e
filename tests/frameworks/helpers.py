"""A tiny random transformers LLaMA shared by the side-by-side tests (no fetched assets needed)."""

from __future__ import annotations

import torch
import transformers


def tiny_hf_llama(vocab_size: int = 128, seed: int = 0) -> transformers.LlamaForCausalLM:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def ids(shape=(2, 32), vocab_size: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))
