"""The shared model-level driver against hand-built references on tiny random LLaMAs (ours and transformers')."""

import copy

import pytest
import torch
from torch import nn

from effref.models import load_model
from effref.models.llama import Llama
from effref.quantization import QuantConfig, QuantLinear, fake_quantize, quantize, quantize_model

CFG = QuantConfig(3, group_size=32)


def _models():
    hf = load_model("tiny-llama").model
    return {"hf": hf, "effref": Llama.from_hf(hf)}


def _logits(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _block_linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ("layers." in n or "blocks." in n)]


@pytest.mark.parametrize("impl", ["hf", "effref"])
def test_rtn_through_the_driver_equals_fake_quantized_weights(impl):
    model = _models()[impl]
    reference = copy.deepcopy(model)
    for name in _block_linears(reference):  # independent path: overwrite the float weights in place
        lin = reference.get_submodule(name)
        lin.weight.data = fake_quantize(lin.weight.data, CFG)
    quantize_model(model, lambda name, linear, stats: quantize(linear.weight, CFG), progress=False)
    swapped = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert swapped == _block_linears(reference) and len(swapped) == 14  # lm_head untouched
    ids = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids))


@pytest.mark.parametrize("impl", ["hf", "effref"])
def test_block_statistics_come_from_the_already_quantized_earlier_blocks(impl):
    model = _models()[impl]
    calib = torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(0))
    blocks = model.model.layers if impl == "hf" else model.blocks
    seen = {}

    def method(name, linear, stats):
        seen[name] = stats
        return quantize(linear.weight, QuantConfig(2, "channel"))

    reference = copy.deepcopy(model)
    quantize_model(model, method, calib, needs=("hessian", "abs_max", "abs_mean", "samples"), batch_size=2,
                   max_samples=1000, progress=False)
    # independent: quantize block 0 of the copy by overwriting weights, then hook block 1's first linear
    ref_blocks = reference.model.layers if impl == "hf" else reference.blocks
    for lin in (m for m in ref_blocks[0].modules() if isinstance(m, nn.Linear)):
        lin.weight.data = quantize(lin.weight.data, QuantConfig(2, "channel")).dequantize()
    q1 = ref_blocks[1].self_attn.q_proj if impl == "hf" else ref_blocks[1].attn.q_proj
    rows = []
    handle = q1.register_forward_hook(lambda m, i, o: rows.append(i[0].reshape(-1, i[0].shape[-1])))
    _logits(reference, calib)
    handle.remove()
    x = torch.cat(rows)  # (5·24, 64)
    name = next(n for n in seen if ".1." in n and "q_proj" in n)
    stats = seen[name]
    assert stats.n_tokens == 120 and stats.samples.shape == (120, 64)
    torch.testing.assert_close(stats.hessian, x.T @ x / len(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stats.abs_max, x.abs().amax(0))
    torch.testing.assert_close(stats.abs_mean, x.abs().mean(0))
    # q/k/v read one tensor and share statistics; gate/up share another; o_proj and down have their own
    by_kind = {n.split(".")[-1]: id(s) for n, s in seen.items() if ".1." in n}
    assert by_kind["q_proj"] == by_kind["k_proj"] == by_kind["v_proj"] != by_kind["o_proj"]
    up, gate = ("up_proj", "gate_proj") if impl == "hf" else ("up", "gate")
    assert by_kind[up] == by_kind[gate] != by_kind["q_proj"]
    assert blocks is not None


def test_block_ids_restrict_the_work():
    model = _models()["effref"]
    quantize_model(model, lambda n, lin, s: quantize(lin.weight, CFG), block_ids=[1], progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.blocks[0].modules())
    assert sum(isinstance(m, QuantLinear) for m in model.blocks[1].modules()) == 7


@pytest.mark.parametrize("kwargs, error, message", [
    ({"needs": ("hessian",)}, ValueError, r"needs calibration data \(hessian\) but calib_batches=None"),
    ({"needs": ("gradients",)}, ValueError, r"needs=\['gradients'\] are not known statistics"),
    ({"target": lambda n, m: "norm" in n and "blocks" in n}, TypeError,
     "only nn.Linear modules can be quantized"),
    ({"target": lambda n, m: isinstance(m, nn.Linear)}, ValueError, "lm_head, which is outside the decoder"),
    ({"target": lambda n, m: False}, ValueError, "selected no nn.Linear"),
    ({"block_ids": [5]}, ValueError, r"block_ids=\[5\] out of range; the model has 2 blocks"),
    ({"calib_batches": torch.randn(2, 8), "needs": ("hessian",)}, ValueError, "must be a \\(n, T\\) tensor of token ids"),
])
def test_bad_arguments_fail_with_clear_messages(kwargs, error, message):
    model = _models()["effref"]
    with pytest.raises(error, match=message):
        quantize_model(model, lambda n, lin, s: quantize(lin.weight, CFG), progress=False, **kwargs)


def test_method_returning_something_else_is_refused():
    with pytest.raises(TypeError, match="return an nn.Module or a QTensor"):
        quantize_model(_models()["effref"], lambda n, lin, s: lin.weight, progress=False)
