"""Every model-level call refuses a config of the wrong type by name, with what to pass, and changes nothing.

Before, a ``QuantConfig`` where a ``GPTQConfig`` belongs failed deep inside GPTQ with "'QuantConfig' object has no
attribute 'quant'", and a bare float where a ``PruneConfig`` belongs with "'float' object has no attribute
'check_shape'".
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from effref.checks import config_or_default
from effref.peft.lora import LoraConfig, apply_lora
from effref.pruning import PruneConfig
from effref.pruning.llm_pruner import llm_prune
from effref.pruning.magnitude import magnitude_prune_model
from effref.pruning.sparsegpt import sparsegpt_prune_model
from effref.pruning.wanda import wanda_prune_model
from effref.quantization import QuantConfig
from effref.quantization.awq import AWQConfig, awq_model
from effref.quantization.gptq import GPTQConfig, gptq_model
from effref.quantization.outlier_suppression import os_plus_model
from effref.quantization.quip import quip_model
from effref.quantization.rtn import rtn_model
from effref.quantization.smoothquant import smoothquant_model
from effref.quantization.spqr import spqr_model
from effref.quantization.zeroquant import zeroquant_model


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


CALIB = torch.randint(0, 64, (2, 16))

CASES = [  # (call, what it was given, the expected class named in the error)
    (lambda m: gptq_model(m, CALIB, QuantConfig(4)), "GPTQConfig"),
    (lambda m: awq_model(m, CALIB, QuantConfig(4)), "AWQConfig"),
    (lambda m: spqr_model(m, CALIB, QuantConfig(3)), "SpQRConfig"),
    (lambda m: quip_model(m, CALIB, QuantConfig(2)), "QuIPConfig"),
    (lambda m: rtn_model(m, {"bits": 4}), "QuantConfig"),
    (lambda m: smoothquant_model(m, CALIB, 0.5), "SmoothQuantConfig"),
    (lambda m: os_plus_model(m, CALIB, QuantConfig(8)), "OSPlusConfig"),
    (lambda m: zeroquant_model(m, QuantConfig(8)), "WAQuantConfig"),
    (lambda m: wanda_prune_model(m, CALIB, 0.5), "PruneConfig"),
    (lambda m: sparsegpt_prune_model(m, CALIB, "2:4"), "PruneConfig"),
    (lambda m: magnitude_prune_model(m, 0.5), "PruneConfig"),
    (lambda m: llm_prune(m, CALIB, PruneConfig(0.3)), "LLMPrunerConfig"),
    (lambda m: apply_lora(m, {"r": 8}), "LoraConfig"),
]


@pytest.mark.parametrize("call, expected", CASES, ids=[c[1] + f"-{i}" for i, c in enumerate(CASES)])
def test_wrong_config_type_is_named_with_the_fix_and_nothing_changes(call, expected):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(TypeError, match=rf"cfg must be a {expected}, got \w+ .*; pass e.g. {expected}\("):
        call(model)
    assert [type(m) for m in model.modules()] == modules
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_config_or_default():
    assert config_or_default(None, LoraConfig, "LoraConfig()") == LoraConfig()
    cfg = LoraConfig(r=4)
    assert config_or_default(cfg, LoraConfig, "LoraConfig()") is cfg
    with pytest.raises(TypeError, match=r"settings must be a LoraConfig, got dict \{'r': 4\}; pass e.g. X"):
        config_or_default({"r": 4}, LoraConfig, "X", name="settings")


def odd_model() -> LlamaForCausalLM:
    """A model whose MLP is 96 wide: down_proj's input dimension has no divisor 64 for a group size."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


ATOMIC_CASES = [  # a call that refuses one layer of odd_model(), and what it says
    (lambda m: rtn_model(m, QuantConfig(4, group_size=64), progress=False), "down_proj: group_size=64"),
    (lambda m: gptq_model(m, CALIB, GPTQConfig(QuantConfig(4, group_size=64)), progress=False), "down_proj"),
    (lambda m: awq_model(m, CALIB, AWQConfig(QuantConfig(4, group_size=64)), progress=False), "down_proj"),
    (lambda m: wanda_prune_model(m, CALIB, PruneConfig(nm=(2, 64)), progress=False), "divisible by M=64"),
    (lambda m: magnitude_prune_model(m, PruneConfig(nm=(2, 64)), progress=False), "divisible by M=64"),
    (lambda m: sparsegpt_prune_model(m, CALIB, PruneConfig(nm=(2, 64)), progress=False), "divisible by M=64"),
]


@pytest.mark.parametrize("call, message", ATOMIC_CASES, ids=range(len(ATOMIC_CASES)))
def test_a_refused_layer_leaves_the_whole_model_as_it_was(call, message):
    # validate every layer, then change: before, RTN had swapped 6 of 14 linears when the 7th raised
    model = odd_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=message):
        call(model)
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("call", [lambda m: rtn_model(m, QuantConfig(4, group_size=32), progress=False),
                                  lambda m: wanda_prune_model(m, CALIB, PruneConfig(0.5), progress=False)],
                         ids=["rtn", "wanda"])
def test_nan_weights_are_refused_before_anything_changes(call):
    model = odd_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj has inf or NaN weights"):
        call(model)
    assert all(torch.equal(before[k].nan_to_num(), v.nan_to_num()) for k, v in model.state_dict().items())


@pytest.mark.parametrize("call, name", [
    (lambda m: wanda_prune_model(m, PruneConfig(0.5), CALIB), "wanda_prune_model"),
    (lambda m: sparsegpt_prune_model(m, PruneConfig(0.5), CALIB), "sparsegpt_prune_model"),
    (lambda m: gptq_model(m, GPTQConfig(), CALIB), "gptq_model"),
    (lambda m: awq_model(m, AWQConfig(), CALIB), "awq_model"),
    (lambda m: smoothquant_model(m, QuantConfig(8), CALIB), "smoothquant_model"),
])
def test_the_old_argument_order_is_refused_with_the_one_order(call, name):
    # every model-level compression call takes (model, calib_batches, cfg); pruners used to take the config first
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=rf"{name} takes \(model, calib_batches, cfg\).*got \w*Config"):
        call(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
