"""QAT: STE gradients by definition, the QAT linear against basics, KV fake quantization against the real cache,
and LLM-QAT's data generation and distillation on a tiny LLaMA."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effref.models import load_model
from effref.models.llama import Llama
from effref.quantization import QuantConfig, fake_quantize
from effref.quantization.basics import code_range, find_params
from effref.quantization.kv_cache import KVQuantConfig, WithQuantizedKV
from effref.quantization.qat import (
    LLMQATConfig,
    QATLinear,
    distillation_loss,
    generate_data,
    llm_qat,
    prepare_qat,
    ste_fake_quantize,
    student_logits,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # training a tiny model (tests/conftest.py)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip_ratio", [1.0, 0.6])
def test_ste_gradient_is_identity_inside_the_clip_range_and_zero_outside(symmetric, clip_ratio):
    cfg = QuantConfig(bits=4, granularity="channel", symmetric=symmetric, scale_dtype=torch.float32)
    x = (3 * torch.randn(6, 40)).requires_grad_()
    y = ste_fake_quantize(x, cfg, clip_ratio)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    # by definition: the code before clamping lies in [q_min, q_max]
    scale, zero = find_params(x.detach()[:, None, :] * clip_ratio, 4, symmetric, torch.float32)
    code = torch.round(x.detach() / scale[:, 0]) + (0 if zero is None else zero[:, 0])
    lo, hi = code_range(4, symmetric)
    inside = (code >= lo) & (code <= hi)
    torch.testing.assert_close(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)), atol=0, rtol=1e-6)
    assert (x.grad[~inside] == 0).all()  # exactly zero outside: (·) · s / s only rounds inside
    if clip_ratio < 1:
        assert (~inside).any() and inside.any()
    else:
        assert inside.all()


def test_ste_forward_equals_round_to_nearest_of_basics():
    cfg = QuantConfig(bits=3, granularity="group", group_size=16, scale_dtype=torch.float32)
    w = torch.randn(8, 64)
    torch.testing.assert_close(ste_fake_quantize(w, cfg), fake_quantize(w, cfg))


def test_qat_linear_forward_and_weight_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(32, 12)
    w_cfg = QuantConfig(bits=4, granularity="channel", symmetric=True, scale_dtype=torch.float32)
    a_cfg = QuantConfig(bits=8, granularity="channel", symmetric=True, scale_dtype=torch.float32)
    layer = QATLinear.from_linear(lin, w_cfg, a_cfg)
    assert layer.weight is lin.weight  # shares, does not copy
    x = torch.randn(3, 5, 32)
    y = layer(x)
    x_hat = fake_quantize(x.reshape(15, 32), a_cfg).reshape(3, 5, 32)
    torch.testing.assert_close(y, F.linear(x_hat, fake_quantize(lin.weight.detach(), w_cfg), lin.bias))
    grad_out = torch.randn_like(y)
    (y * grad_out).sum().backward()
    # symmetric absmax clips nothing, so ∂Ŵ/∂W = I and the weight gradient is grad_outᵀ x̂
    torch.testing.assert_close(lin.weight.grad, grad_out.reshape(15, 12).T @ x_hat.reshape(15, 32))


@pytest.fixture(scope="module")
def tiny():
    return Llama.from_hf(load_model("tiny-llama").model)


def test_training_kv_fake_quantization_matches_the_inference_cache(tiny):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    kv_cfg = LLMQATConfig(kv_bits=4).configs()[2]
    train_view = student_logits(tiny, ids, kv_cfg)  # STE fake quantization inside attention
    inference = WithQuantizedKV(tiny, KVQuantConfig(bits=4, granularity="token"))(ids)  # packed int4 cache
    torch.testing.assert_close(train_view, inference, atol=1e-5, rtol=1e-5)


def test_generated_data_starts_greedy_then_samples(tiny):
    gen = torch.Generator().manual_seed(0)
    data = generate_data(tiny, n_sequences=6, seq_len=12, greedy_tokens=3, batch_size=4, generator=gen)
    assert data.shape == (6, 12) and data.dtype == torch.long
    for row in data:
        greedy = tiny.generate(row[None, :1], max_new_tokens=3)[0]  # the model's own greedy decoding
        assert torch.equal(row[:4], greedy)
    again = generate_data(tiny, 6, 12, 3, 4, torch.Generator().manual_seed(0))
    assert torch.equal(data, again)  # seeded


def test_distillation_loss_is_cross_entropy_with_soft_labels():
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()
    entropy = -(t.softmax(-1) * t.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(s, t), kl + entropy)


def _kl(teacher, student, ids, kv_cfg):
    with torch.no_grad():
        t, s = teacher(ids).log_softmax(-1), student_logits(student, ids, kv_cfg).log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean().item()


def test_llm_qat_reduces_the_gap_to_the_teacher_and_leaves_it_alone(tiny):
    teacher = copy.deepcopy(tiny)
    with torch.no_grad():
        teacher.embed.weight.mul_(30)  # tied with the head: confident predictions, so rounding is visible
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = LLMQATConfig(w_bits=2, a_bits=8, kv_bits=4, n_sequences=16, seq_len=16, steps=20, batch_size=8, lr=3e-3)
    kv_cfg = cfg.configs()[2]
    result = llm_qat(teacher, cfg, progress=False)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert len(result.losses) == 20 and result.data.shape == (16, 16)
    assert sum(isinstance(m, QATLinear) for m in result.student.modules()) == 14
    untrained = prepare_qat(copy.deepcopy(teacher), *cfg.configs()[:2], progress=False)
    held_out = generate_data(teacher, 8, 16, generator=torch.Generator().manual_seed(1))
    kl_before, kl_after = _kl(teacher, untrained, held_out, kv_cfg), _kl(teacher, result.student, held_out, kv_cfg)
    assert kl_after < 0.7 * kl_before  # distillation closes a good part of the 2-bit gap on new teacher text


BAD = [
    (lambda: ste_fake_quantize(torch.ones(2, 4), QuantConfig(), clip_ratio=0.0), ValueError, r"clip_ratio=0\.0"),
    (lambda: QATLinear.from_linear(nn.Conv1d(2, 2, 1), QuantConfig()), TypeError, r"linear must be an nn\.Linear"),
    (lambda: QATLinear.from_linear(nn.Linear(100, 4), QuantConfig(group_size=64)), ValueError,
     r"group_size=64 does not divide in_features=100"),
    (lambda: generate_data(load_model("tiny-llama").model, 2, 8), TypeError, r"teacher must be an effref Llama"),
    (lambda: generate_data(Llama.from_hf(load_model("tiny-llama").model), 2, 1), ValueError, r"2 ≤ seq_len"),
    (lambda: llm_qat(nn.Linear(2, 2)), TypeError, r"teacher must be an effref Llama"),
    (lambda: prepare_qat(nn.Sequential(nn.Linear(2, 2)), QuantConfig()), ValueError, r"found no nn\.ModuleList"),
]


@pytest.mark.parametrize("make, error, message", BAD)
def test_bad_arguments_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        make()
