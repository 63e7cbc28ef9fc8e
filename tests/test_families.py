"""Every compression technique on every transformers family a course uses (tiny random models, fast): it runs and
changes the model, or it refuses the family by name. Nothing in between (a crash deep inside, or a silently
wrong result)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from tiny_families import CALIB, FAMILIES, IDS

from effref.lowrank import losparse_compress_model
from effref.lowrank.svd import svd_compress_model
from effref.peft import LoraConfig, apply_lora, merge_and_unload
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

Q4 = QuantConfig(4, group_size=32)


def lora_merged(model):
    targets = ("c_attn",) if isinstance(model, transformers.GPT2LMHeadModel) else ("q_proj", "v_proj")
    apply_lora(model, LoraConfig(r=4, target_modules=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return merge_and_unload(model)


TECHNIQUES = {
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
    "lora + merge_and_unload": lora_merged,
}
REFUSED = {  # (family, technique): what the refusal says
    ("opt", "llm-pruner"): "OPTDecoderLayer is not a LLaMA-shaped block .*wanda_prune_model",
    ("gpt2", "llm-pruner"): "GPT2Block is not a LLaMA-shaped block .*wanda_prune_model",
}
MAX_CHANGE = {"bitnet": 3.0}  # ternary weights without the training BitNet does: large, but finite and bounded


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("family", FAMILIES)
def test_technique_runs_on_family_or_refuses_it_by_name(family, technique):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    with torch.no_grad():
        dense = model(IDS).logits
    if (family, technique) in REFUSED:
        state = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match=REFUSED[family, technique]):
            TECHNIQUES[technique](model)
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        return
    result = TECHNIQUES[technique](model)
    model = result if isinstance(result, torch.nn.Module) else model  # merge_and_unload returns the model
    with torch.no_grad():
        after = model(IDS).logits
    assert after.isfinite().all()
    change = ((after - dense).norm() / dense.norm()).item()
    assert 0 < change < MAX_CHANGE.get(technique, 1.0), f"{technique} on {family}: relative change of the logits {change:.3f}"
