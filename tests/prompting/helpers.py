"""A tiny Llama and a character-level tokenizer, so the prompting tests run without fetched assets."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from effref.models.llama import Llama, LlamaConfig


def tiny_llama(vocab_size: int = 128, seed: int = 0, n_layers: int = 2, max_seq_len: int = 256) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(vocab_size=vocab_size, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                             d_ff=64, max_seq_len=max_seq_len)).eval()


class CharTokenizer:
    """One token per ASCII character, with offsets, like a fast Hugging Face tokenizer's output."""

    def __call__(self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = False):
        ids = [ord(c) % 128 for c in text]
        out = SimpleNamespace(input_ids=ids)
        if return_offsets_mapping:
            out.offset_mapping = [(i, i + 1) for i in range(len(text))]
        return out

    def decode(self, ids) -> str:
        return "".join(chr(int(i)) for i in ids)
