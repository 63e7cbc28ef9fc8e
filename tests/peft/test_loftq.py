"""LoftQ: ‖W − (Q + AB)‖ falls over the iterations and beats QLoRA's Q(W) + 0; the layer realises Q_T + B_TA_T."""

import copy
import itertools

import pytest
import torch

from effref.models import load_model
from effref.peft.loftq import LoftQConfig, apply_loftq, loftq_decompose, loftq_layer
from effref.peft.lora import LoraConfig
from effref.peft.qlora import LLAMA_LINEARS, NF4Linear, fake_quantize_nf4, quantize_model_nf4


def _weight(seed=0, d=192, k=128, rank=6):
    """Noise plus a strong low-rank part, like the outlier structure of trained weights."""
    g = torch.Generator().manual_seed(seed)
    return 0.02 * torch.randn(d, k, generator=g) + 0.01 * torch.randn(d, rank, generator=g) @ torch.randn(
        rank, k, generator=g)


def test_loftq_error_decreases_over_iterations_and_beats_plain_quantization():
    w = _weight()
    _, _, _, errors = loftq_decompose(w, r=8, cfg=LoftQConfig(iterations=5))
    qlora_error = float(torch.linalg.matrix_norm(w - fake_quantize_nf4(w)))  # Q(W) + 0, B = 0
    assert errors[0] < qlora_error  # one SVD of the residual already helps
    assert all(later <= earlier * (1 + 1e-4) for earlier, later in itertools.pairwise(errors))
    assert errors[-1] < 0.97 * errors[0]  # alternating keeps paying off on this weight


def test_loftq_errors_are_what_they_claim_to_be():
    """Recompute ‖W − Q_T − B_TA_T‖ from the returned pieces independently of the loop's bookkeeping."""
    w = _weight(1)
    residual, a, b, errors = loftq_decompose(w, r=4, cfg=LoftQConfig(iterations=3))
    q = fake_quantize_nf4(residual)
    assert float(torch.linalg.matrix_norm(w - q - b @ a)) == pytest.approx(errors[-1], rel=1e-5)
    # B_TA_T is the best rank-4 fit of W − Q_T (Eckart–Young): its error is the tail of the singular values
    tail = torch.linalg.svdvals(w - q)[4:]
    assert errors[-1] == pytest.approx(float(tail.norm()), rel=1e-4)


def test_loftq_layer_equals_nf4_base_plus_scaled_lora():
    linear = torch.nn.Linear(128, 192)
    with torch.no_grad():
        linear.weight.copy_(_weight(2))
    layer, errors = loftq_layer(linear, LoraConfig(r=8, alpha=32), LoftQConfig(iterations=2))
    assert isinstance(layer.base, NF4Linear)
    effective = layer.base.dequantized_weight() + layer.delta_weight()  # Q_T + (α/r)·B A
    assert float(torch.linalg.matrix_norm((linear.weight - effective).detach())) == pytest.approx(errors[-1], rel=1e-4)
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), x @ effective.T + linear.bias, rtol=1e-4, atol=1e-5)


def test_apply_loftq_starts_closer_to_the_float_model_than_qlora():
    base = load_model("tiny-llama", seed=0).model
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = base(ids).logits
    loftq = copy.deepcopy(base)
    errors = apply_loftq(loftq, LoraConfig(r=8, alpha=16, target_modules=LLAMA_LINEARS), LoftQConfig(iterations=3))
    qlora = quantize_model_nf4(copy.deepcopy(base))
    assert len(errors) == 2 * len(LLAMA_LINEARS)
    assert all(p.requires_grad == ("lora_" in n) for n, p in loftq.named_parameters())
    gap_loftq = (loftq(ids).logits - reference).norm()
    gap_qlora = (qlora(ids).logits - reference).norm()
    assert gap_loftq < 0.8 * gap_qlora


@pytest.mark.parametrize("call, error, message", [
    (lambda: LoftQConfig(iterations=0), ValueError, "iterations=0 must be an integer >= 1"),
    (lambda: loftq_decompose(torch.randn(64, 64), r=0), ValueError, r"r=0 must satisfy 0 < r <= min\(64, 64\)"),
    (lambda: loftq_decompose(torch.randn(64, 64), r=65), ValueError, "r=65 must satisfy"),
    (lambda: loftq_decompose(torch.randn(64), r=1), ValueError, "must be a 2-D weight"),
    (lambda: loftq_layer(torch.nn.Conv1d(4, 4, 1), LoraConfig(r=1)), TypeError, "got Conv1d"),
    (lambda: apply_loftq(torch.nn.Sequential(torch.nn.Linear(64, 64)), LoraConfig(r=1, target_modules=("x",))),
     ValueError, "match no linear layer"),
])
def test_loftq_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()
