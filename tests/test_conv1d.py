"""GPT-2 (transformers Conv1D layers) through the techniques: convert to nn.Linear, compress, convert back, save."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from effref.models.conv1d import LinearFromConv1D, conv1d_from_linear, linear_from_conv1d
from effref.peft import LoraConfig, apply_lora, merge_and_unload
from effref.pruning import PruneConfig, sparsity_report, wanda_prune_model
from effref.quantization import GPTQConfig, QuantConfig, gptq_model, rtn_model

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4)).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_conversion_keeps_the_function_and_round_trips_exactly():
    model = gpt2()
    before, state = logits(model), {k: v.clone() for k, v in model.state_dict().items()}
    linear_from_conv1d(model)
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert sum(isinstance(m, LinearFromConv1D) for m in model.modules()) == 2 * 4  # c_attn, c_proj, c_fc, c_proj
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)
    conv1d_from_linear(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # transposed twice: exact


@pytest.mark.parametrize("technique", ["rtn", "gptq", "wanda 2:4", "lora"])
def test_techniques_run_on_converted_gpt2(technique, tmp_path):
    model = linear_from_conv1d(gpt2())
    dense = logits(model)
    if technique == "rtn":
        rtn_model(model, QuantConfig(4, group_size=32), progress=False)
    elif technique == "gptq":
        gptq_model(model, IDS, GPTQConfig(QuantConfig(4, group_size=32)), progress=False)
    elif technique == "wanda 2:4":
        wanda_prune_model(model, IDS, PruneConfig(nm="2:4"), progress=False)
        assert sparsity_report(model)[1] == pytest.approx(0.5)
        conv1d_from_linear(model)  # pruned in place: back to Conv1D, and through save / load
        model.save_pretrained(tmp_path)
        torch.testing.assert_close(logits(GPT2LMHeadModel.from_pretrained(tmp_path).eval()), logits(model))
    else:
        apply_lora(model, LoraConfig(r=4, target_modules=("c_attn", "c_fc")))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
        adapted = logits(model)
        merge_and_unload(model)
        torch.testing.assert_close(logits(model), adapted, rtol=1e-5, atol=1e-5)
    changed = logits(model)
    assert changed.isfinite().all() and not torch.allclose(changed, dense, atol=1e-4)


@pytest.mark.parametrize("call", [
    lambda m: gptq_model(m, IDS, GPTQConfig(), progress=False),
    lambda m: wanda_prune_model(m, IDS, PruneConfig(0.5), progress=False),
    lambda m: apply_lora(m, LoraConfig(target_modules=("c_attn",))),
], ids=["gptq", "wanda", "lora"])
def test_unconverted_gpt2_is_refused_with_the_conversion(call):
    with pytest.raises(ValueError, match=r"Conv1D layers.*linear_from_conv1d\(model\)"):
        call(gpt2())


def test_conversion_refuses_models_without_such_layers():
    with pytest.raises(ValueError, match="no Conv1D layers"):
        linear_from_conv1d(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="no layers made by linear_from_conv1d"):
        conv1d_from_linear(gpt2())
