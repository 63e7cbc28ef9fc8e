"""Tiny random transformers models of every family a course uses, shared by the family tables of the tests.

Each builder returns a fresh two-block model (hidden size 64, vocabulary 128) in float32; GPT-2 comes with its
Conv1D layers converted to nn.Linear (``effref.models.conv1d.linear_from_conv1d``), as effref asks users to do.
"""

from __future__ import annotations

import torch
import transformers

from effref.lowrank import losparse_compress_model
from effref.lowrank.svd import svd_compress_model
from effref.models.conv1d import linear_from_conv1d
from effref.pruning import PruneConfig, magnitude_prune_model, sparsegpt_prune_model, wanda_prune_model
from effref.pruning.llm_pruner import LLMPrunerConfig, llm_prune
from effref.quantization import (
    AWQConfig,
    GPTQConfig,
    QuantConfig,
    SmoothQuantConfig,
    WAQuantConfig,
    awq_model,
    bitnet_model,
    gptq_model,
    llm_int8_model,
    os_plus_model,
    rtn_model,
    smoothquant_model,
    spqr_model,
    zeroquant_model,
)
from effref.quantization.quip import QuIPConfig, quip_model
from effref.quantization.spqr import SpQRConfig

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
Q4 = QuantConfig(4, group_size=32)
COMPRESSION_CALLS = {  # every model-level compression call, on a tiny model of any family
    "rtn": lambda m: rtn_model(m, Q4, progress=False),
    "gptq": lambda m: gptq_model(m, CALIB, GPTQConfig(Q4), progress=False),
    "awq": lambda m: awq_model(m, CALIB, AWQConfig(Q4), progress=False),
    "llm.int8": lambda m: llm_int8_model(m, CALIB, progress=False),
    "zeroquant": lambda m: zeroquant_model(m, WAQuantConfig(group_size=32), progress=False),
    "smoothquant": lambda m: smoothquant_model(m, CALIB, SmoothQuantConfig(), progress=False),
    "magnitude": lambda m: magnitude_prune_model(m, PruneConfig(0.5), progress=False),
    "wanda 2:4": lambda m: wanda_prune_model(m, CALIB, PruneConfig(nm="2:4"), progress=False),
    "sparsegpt": lambda m: sparsegpt_prune_model(m, CALIB, PruneConfig(0.5), progress=False),
    "svd": lambda m: svd_compress_model(m, 0.5, progress=False),
    "quip": lambda m: quip_model(m, CALIB, QuIPConfig(GPTQConfig(Q4)), progress=False),
    "spqr": lambda m: spqr_model(m, CALIB, SpQRConfig(), progress=False),
    "os+": lambda m: os_plus_model(m, CALIB, progress=False),
    "bitnet": lambda m: bitnet_model(m, progress=False),
    "llm-pruner": lambda m: llm_prune(m, CALIB[:2], LLMPrunerConfig(ratio=0.25), progress=False),
    "losparse": lambda m: losparse_compress_model(m, 0.5, 0.05, progress=False),
}
