"""Mixed precision: our loss scaler follows torch.amp.GradScaler step for step; master weights, BF16, cast reports."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from effref.models.llama import Llama, LlamaConfig
from effref.pretraining.adamw import AdamW, AdamWConfig
from effref.pretraining.mixed_precision import (DynamicLossScaler, LossScalerConfig, MixedPrecision,
                                                MixedPrecisionConfig, cast_report, format_limits,
                                                lost_update_fraction)
from effref.pretraining.training import PretrainConfig, pretrain

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = LlamaConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=32,
                   tie_embeddings=True)


def tiny_llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(TINY)


def token_stream(n: int = 4000, seed: int = 0) -> torch.Tensor:
    """A learnable stream: a random cycle of 13 tokens, every 5th token replaced by noise."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(TINY.vocab_size, generator=gen)[torch.arange(n) % 13]  # (n,)
    ids[::5] = torch.randint(0, TINY.vocab_size, (len(ids[::5]),), generator=gen)
    return ids


def test_growth_interval_and_backoff_follow_gradscaler_on_the_same_gradients():
    """Feed both scalers the same fp16 gradients, S·g rounded to fp16 (overflowing where S·g > 65504, plus a
    NaN injected on purpose); scales, skipped steps and parameters agree at every one of 40 steps."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(16, generator=gen) * 10 ** torch.empty(1).uniform_(-2, 2, generator=gen) for _ in range(40)]
    grads[17][3] = float("nan")
    cfg = LossScalerConfig(init_scale=2.0 ** 14, growth_interval=3)
    ours, ref = DynamicLossScaler(cfg), torch.amp.GradScaler("cpu", init_scale=cfg.init_scale,
                                                             growth_interval=cfg.growth_interval)
    p_ours, p_ref = torch.nn.Parameter(torch.zeros(16)), torch.nn.Parameter(torch.zeros(16))
    opt_ours, opt_ref = torch.optim.SGD([p_ours], lr=0.1), torch.optim.SGD([p_ref], lr=0.1)
    skips = grows = 0
    for g in grads:
        loss = torch.ones(())
        before = ours.scale(loss).item()
        assert ref.scale(loss).item() == before  # GradScaler creates its scale tensor here
        for p in (p_ours, p_ref):
            p.grad = (g * before).half().float()  # what a backward in fp16 of S·L hands over
        ours.step(opt_ours)
        ours.update()
        ref.step(opt_ref)
        ref.update()
        assert ours.get_scale() == ref.get_scale()
        torch.testing.assert_close(p_ours, p_ref, rtol=0, atol=0)
        skips += ours.found_inf
        grows += ours.get_scale() > before
    assert skips >= 3 and grows >= 3  # both rules were exercised
    assert [s for _, s in ours.history].count(True) == skips


def _fp16_run(scaler, steps=30):
    model = tiny_llama()
    mp = MixedPrecision(model, lambda ps: AdamW(ps, AdamWConfig(lr=3e-3)),
                        MixedPrecisionConfig(scaler=LossScalerConfig(init_scale=2.0 ** 24, growth_interval=4)),
                        scaler=scaler)
    result = pretrain(model, token_stream(), mp, PretrainConfig(steps=steps, batch_size=4, seq_len=16,
                                                                warmup_steps=2), progress=False)
    return model, mp, result


def test_mixed_precision_with_our_scaler_equals_it_with_gradscaler():
    """A tiny LLaMA trained in fp16 from S = 2²⁴ (overflowing on purpose) with either scaler: the same scale
    trajectory, the same skipped steps, bit-identical weights."""
    model_a, _, ours = _fp16_run(None)
    model_b, _, ref = _fp16_run(torch.amp.GradScaler("cpu", init_scale=2.0 ** 24, growth_interval=4))
    assert ours.scales == ref.scales and ours.skipped == ref.skipped
    assert sum(ours.skipped) >= 3 and max(ours.scales[1:]) > min(ours.scales)  # backed off, and grew again
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert next(model_a.parameters()).dtype == torch.float16
    assert ours.losses[-1] < ours.losses[0]


def test_gradscaler_refuses_fp16_gradients_which_is_why_master_weights_exist():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    p.grad = torch.ones(4, dtype=torch.float16)
    reference = torch.amp.GradScaler("cpu")
    reference.scale(torch.ones(()))
    with pytest.raises(ValueError, match="FP16"):
        reference.step(torch.optim.SGD([p], lr=0.1))
    with pytest.raises(ValueError, match="fp32 master"):
        DynamicLossScaler().step(torch.optim.SGD([p], lr=0.1))


def test_an_overflowing_step_changes_nothing_and_halves_the_scale():
    model = tiny_llama()
    mp = MixedPrecision(model, lambda ps: AdamW(ps, AdamWConfig(lr=1e-2)),
                        MixedPrecisionConfig(scaler=LossScalerConfig(init_scale=2.0 ** 40)))
    weights = [p.clone() for p in model.parameters()]
    masters = [m.clone() for m in mp.master]
    ids = token_stream()[:17].reshape(1, 17)
    loss = F.cross_entropy(model(ids[:, :-1]).float().reshape(-1, TINY.vocab_size), ids[0, 1:])
    mp.backward(loss)
    record = mp.step()
    assert record.skipped and record.scale == 2.0 ** 40 and mp.scaler.get_scale() == 2.0 ** 39
    assert not mp.optimizer.state  # the optimizer never ran: no moments were touched
    for a, b in zip(weights, model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(masters, mp.master):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_master_weights_keep_updates_that_fp16_weights_lose():
    """SGD with steps below half an fp16 spacing: the fp32 master moves, fp16 weights updated directly do not."""
    w = torch.full((1000,), 1.0)
    update = torch.full((1000,), -1e-4)  # the fp16 spacing at 1.0 is 2⁻¹⁰ ≈ 9.8e-4
    assert lost_update_fraction([w], [update], torch.float16) == 1.0
    assert lost_update_fraction([w], [update], torch.float32) == 0.0
    model = torch.nn.Linear(1000, 1, bias=False)
    torch.nn.init.ones_(model.weight)
    mp = MixedPrecision(model, lambda ps: torch.optim.SGD(ps, lr=1e-4), MixedPrecisionConfig(loss_scaling=False))
    direct = torch.ones(1000, dtype=torch.float16)
    for _ in range(20):
        model.weight.grad = torch.ones_like(model.weight)  # dL/dw = 1, so each step subtracts 1e-4
        mp.step()
        direct -= torch.tensor(1e-4, dtype=torch.float16)
    assert torch.all(direct == 1.0)  # twenty lost updates
    assert math.isclose(mp.master[0][0, 0].item(), 1 - 20e-4, rel_tol=1e-5)  # the master kept all twenty
    assert model.weight[0, 0].item() == torch.tensor(1 - 20e-4).half().item()  # the model gets its rounding


def test_bf16_path_trains_without_a_scaler():
    model = tiny_llama()
    mp = MixedPrecision(model, lambda ps: AdamW(ps, AdamWConfig(lr=3e-3)), MixedPrecisionConfig(dtype=torch.bfloat16))
    assert mp.scaler is None and all(m.dtype == torch.float32 for m in mp.master)
    result = pretrain(model, token_stream(), mp, PretrainConfig(steps=20, batch_size=4, seq_len=16, warmup_steps=2),
                      progress=False)
    assert set(result.scales) == {1.0} and not any(result.skipped)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert sum(result.losses[-5:]) < sum(result.losses[:5])


def test_mixed_precision_step_equals_fp32_adamw_on_the_same_fp16_gradients():
    """With loss scaling, the master update is AdamW's update of the unscaled fp32 gradient, exactly."""
    model = tiny_llama()
    reference = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    mp = MixedPrecision(model, lambda ps: AdamW(ps, AdamWConfig(lr=1e-3)),
                        MixedPrecisionConfig(scaler=LossScalerConfig(init_scale=2.0 ** 10)))
    ref_opt = AdamW(reference, AdamWConfig(lr=1e-3))
    ids = token_stream()[:34].reshape(2, 17)
    loss = F.cross_entropy(model(ids[:, :-1]).float().reshape(-1, TINY.vocab_size), ids[:, 1:].reshape(-1))
    mp.backward(loss)
    for r, p in zip(reference, model.parameters()):
        r.grad = p.grad.float() / 2.0 ** 10  # the scaled fp16 gradient, unscaled in fp32
    mp.step()
    ref_opt.step()
    for r, m in zip(reference, mp.master):
        torch.testing.assert_close(m, r, rtol=0, atol=0)


def test_cast_report_counts_underflow_subnormals_and_overflow():
    values = torch.tensor([2.0 ** -30, 2.0 ** -20, 1e-3, 1.0, 7e4, 1e6])
    fp16 = cast_report(values, torch.float16)
    assert (fp16.flushed_to_zero, fp16.subnormal, fp16.overflowed) == (1 / 6, 1 / 6, 2 / 6)
    bf16 = cast_report(values, torch.bfloat16)
    assert (bf16.flushed_to_zero, bf16.subnormal, bf16.overflowed) == (0, 0, 0)
    scaled = cast_report(values[:4], torch.float16, scale=2.0 ** 16)  # S lifts the small ones into range
    assert (scaled.flushed_to_zero, scaled.subnormal, scaled.overflowed) == (0, 0, 1 / 4)  # and 1.0 overflows
    assert fp16.median_relative_error < 2 ** -11 and bf16.median_relative_error < 2 ** -8


def test_format_limits_are_the_ieee_and_bfloat_numbers():
    fp16, bf16 = format_limits(torch.float16), format_limits(torch.bfloat16)
    assert (fp16["max"], fp16["smallest normal"], fp16["smallest subnormal"]) == (65504.0, 2.0 ** -14, 2.0 ** -24)
    assert (bf16["smallest normal"], bf16["smallest subnormal"]) == (2.0 ** -126, 2.0 ** -133)
    assert bf16["max"] > 3e38 and bf16["epsilon"] == 2.0 ** -7 and fp16["epsilon"] == 2.0 ** -10


@pytest.mark.parametrize("kwargs, message", [
    (dict(init_scale=0.0), "init_scale=0.0"),
    (dict(init_scale=-1.0), "init_scale=-1.0"),
    (dict(init_scale=float("inf")), "init_scale=inf"),
    (dict(growth_factor=1.0), "growth_factor=1.0"),
    (dict(growth_factor=0.5), "growth_factor=0.5"),
    (dict(backoff_factor=1.0), r"backoff_factor=1.0 must be in \(0, 1\)"),
    (dict(backoff_factor=0.0), "backoff_factor=0.0"),
    (dict(growth_interval=0), "growth_interval=0"),
    (dict(growth_interval=2.5), "growth_interval=2.5"),
])
def test_bad_scaler_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossScalerConfig(**kwargs)


def test_bad_mixed_precision_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="dtype=torch.float32"):
        MixedPrecisionConfig(dtype=torch.float32)
    with pytest.raises(TypeError, match="cfg must be a MixedPrecisionConfig"):
        MixedPrecision(tiny_llama(), torch.optim.SGD, cfg=LossScalerConfig())
    with pytest.raises(ValueError, match="loss_scaling is off"):
        MixedPrecision(tiny_llama(), torch.optim.SGD, MixedPrecisionConfig(dtype=torch.bfloat16),
                       scaler=DynamicLossScaler())
    with pytest.raises(ValueError, match="scale=0"):
        cast_report(torch.ones(3), torch.float16, scale=0)
    scaler = DynamicLossScaler()
    with pytest.raises(RuntimeError, match="update"):
        scaler.update()


def test_model_is_cast_in_place_and_keeps_tied_weights():
    model = tiny_llama()
    ids = copy.deepcopy(model.lm_head.weight)
    mp = MixedPrecision(model, lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert model.lm_head.weight is model.embed.weight and len(mp.master) == len(list(model.parameters()))
    torch.testing.assert_close(mp.master[0], ids.float(), rtol=0, atol=0)
    assert model.embed.weight.dtype == torch.float16
