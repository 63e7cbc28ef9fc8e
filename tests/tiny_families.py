"""Tiny random transformers models of every family a course uses, shared by the family tables of the tests.

Each builder returns a fresh two-block model (hidden size 64, vocabulary 128) in float32; GPT-2 comes with its
Conv1D layers converted to nn.Linear (``effref.models.conv1d.linear_from_conv1d``), as effref asks users to do.
"""

from __future__ import annotations

import torch
import transformers

from effref.models.conv1d import linear_from_conv1d

VOCAB = 128
CALIB = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_LIKE)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**LLAMA_LIKE)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**LLAMA_LIKE)),
    "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**LLAMA_LIKE, head_dim=16)),
    "opt": lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=64)),
    "gpt2": lambda: linear_from_conv1d(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4))),
}
