"""Every compression technique on every transformers family a course uses (tiny random models, fast): it runs and
changes the model, or it refuses the family by name. Nothing in between (a crash deep inside, or a silently
wrong result)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from tiny_families import COMPRESSION_CALLS, FAMILIES, IDS

from effref.peft import LoraConfig, apply_lora, merge_and_unload


def lora_merged(model):
    targets = ("c_attn",) if isinstance(model, transformers.GPT2LMHeadModel) else ("q_proj", "v_proj")
    apply_lora(model, LoraConfig(r=4, target_modules=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return merge_and_unload(model)


TECHNIQUES = {**COMPRESSION_CALLS, "lora + merge_and_unload": lora_merged}
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
