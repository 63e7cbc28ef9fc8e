"""QA-LoRA: pooled adapter vs an independent average-pool reference, and the merge is exact in the quantized
domain: same integer codes, same scales, only the zero points move, and the outputs do not change."""

import copy

import pytest
import torch
import torch.nn.functional as F

from effref.models import load_model
from effref.peft.peqa import GroupQuantLinear
from effref.peft.qa_lora import QALoraConfig, QALoraLinear, apply_qa_lora, merge_qa_lora


def _trained_layer(seed=0, group_size=16):
    torch.manual_seed(seed)
    layer = QALoraLinear(GroupQuantLinear(torch.nn.Linear(128, 48), bits=4, group_size=group_size), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.05)  # as if trained: B = 0 would make every check trivial
    return layer


def test_adapter_output_equals_average_pool_reference():
    layer = _trained_layer()
    x = torch.randn(3, 7, 128)
    pooled = F.avg_pool1d(x.reshape(-1, 1, 128), kernel_size=16).reshape(3, 7, 8)  # torch's own pooling
    expected = layer.base(x) + layer.scaling * pooled @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_merge_is_exact_in_the_quantized_domain():
    layer = _trained_layer()
    x = torch.randn(5, 128)
    before = layer(x).detach()
    codes, scale = layer.base.codes.clone(), layer.base.scale.detach().clone()
    w_before = layer.base.dequantized_weight()
    layer.merge()
    assert torch.equal(layer.base.codes, codes)  # the integer codes are untouched (bit for bit)
    assert torch.equal(layer.base.scale.detach(), scale)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-6)  # same function, adapter gone
    # the weight moved by a constant inside every (row, group): what a zero point can express
    shift = (layer.base.dequantized_weight() - w_before).reshape(48, 8, 16)
    torch.testing.assert_close(shift, shift[..., :1].expand_as(shift), rtol=0, atol=1e-6)
    assert shift.abs().max() > 1e-4
    layer.unmerge()
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)


def test_plain_lora_delta_would_not_be_mergeable():
    """The same B, A without pooling gives a ΔW that varies inside groups: no zero-point shift represents it."""
    layer = _trained_layer()
    plain = layer.lora_B.weight @ torch.randn(4, 128)  # an ordinary LoRA A over all 128 inputs
    spread = plain.reshape(48, 8, 16).std(-1)
    assert spread.min() > 1e-3


def test_apply_qa_lora_trains_adapters_and_merges_model_wide():
    base = load_model("tiny-llama", seed=0).model
    model = apply_qa_lora(copy.deepcopy(base), QALoraConfig(r=2, group_size=16))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # per layer r·(in/L + out): q_proj 64→64 has 2·(4 + 64) = 136 adapter parameters
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.numel() == 2 * 4
    with torch.no_grad():
        for n, p in trainable.items():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    merge_qa_lora(model)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("call, error, message", [
    (lambda: QALoraConfig(r=0), ValueError, "r=0 must be a positive integer"),
    (lambda: QALoraConfig(dropout=1.0), ValueError, r"dropout=1.0 must be in \[0, 1\)"),
    (lambda: QALoraLinear(torch.nn.Linear(64, 64), r=2, alpha=4), TypeError, "needs a GroupQuantLinear base"),
    (lambda: QALoraLinear(GroupQuantLinear(torch.nn.Linear(64, 8), group_size=32), r=3, alpha=4), ValueError,
     r"r=3 must satisfy 0 < r <= min\(groups, out_features\) = 2"),
    (lambda: apply_qa_lora(torch.nn.Sequential(torch.nn.Linear(48, 8)), QALoraConfig(target_modules=("0",))),
     ValueError, "group_size=32 does not divide in_features=48 of 0"),
    (lambda: merge_qa_lora(torch.nn.Linear(4, 4)), ValueError, "has no QA-LoRA layers"),
])
def test_qa_lora_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()
