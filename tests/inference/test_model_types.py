"""The inference techniques run on effref's Llama: a transformers model is refused with the conversion that fixes
it (before: AttributeError 'cfg' / 'blocks' from deep inside), and the converted model then runs."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from effref.inference import (
    SkipDecodeConfig,
    SpeculativeConfig,
    decode_greedy,
    layer_skip_draft,
    skipdecode_generate,
    speculative_generate,
)
from effref.models.llama import Llama

PROMPT = torch.tensor([[3, 14, 15, 9, 2]])


def hf_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


CALLS = {
    "speculative": lambda m: speculative_generate(m, m, PROMPT, 4, SpeculativeConfig(gamma=2)),
    "skipdecode": lambda m: skipdecode_generate(m, PROMPT, 4, SkipDecodeConfig(max_layers=2, min_layers=1)),
    "decode_greedy": lambda m: decode_greedy(m, PROMPT, 4, m.new_cache(1, 16) if isinstance(m, Llama) else None,
                                             progress=False),
    "layer_skip_draft": lambda m: layer_skip_draft(m, 1),
}


@pytest.mark.parametrize("name", CALLS)
def test_a_transformers_model_is_refused_with_the_conversion(name):
    with pytest.raises(TypeError, match=r"must be effref's Llama, got LlamaForCausalLM; .*Llama\.from_hf"):
        CALLS[name](hf_llama())


@pytest.mark.parametrize("name", CALLS)
def test_the_converted_model_runs(name):
    CALLS[name](Llama.from_hf(hf_llama()))
