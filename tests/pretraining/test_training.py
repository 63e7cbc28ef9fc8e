"""The pre-training loop: every optimizer learns a learnable stream, Sophia's Hessian is refreshed every k steps,
the schedule is warm-up then cosine, and wrong arguments are refused by name."""

from __future__ import annotations

import math

import pytest
import torch

from effref.models.llama import Llama, LlamaConfig
from effref.pretraining.adamw import AdamW, AdamWConfig
from effref.pretraining.lion import Lion, LionConfig
from effref.pretraining.mixed_precision import MixedPrecision, MixedPrecisionConfig
from effref.pretraining.sophia import Sophia, SophiaConfig
from effref.pretraining.training import PretrainConfig, pretrain, windows

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = LlamaConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=32,
                   tie_embeddings=True)
CFG = PretrainConfig(steps=30, batch_size=4, seq_len=16, warmup_steps=3)


def tiny_llama() -> Llama:
    torch.manual_seed(0)
    return Llama(TINY)


def stream(n: int = 4000) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randperm(TINY.vocab_size, generator=gen)[torch.arange(n) % 11]  # a cycle of 11 tokens


@pytest.mark.parametrize("make", [
    lambda ps: AdamW(ps, AdamWConfig(lr=1e-2)),
    lambda ps: Lion(ps, LionConfig(lr=5e-3)),
    lambda ps: Sophia(ps, SophiaConfig(lr=1e-2, hessian_every=5)),
], ids=["adamw", "lion", "sophia"])
def test_every_optimizer_learns_a_cycle(make):
    model = tiny_llama()
    opt = make(model.parameters())
    result = pretrain(model, stream(), opt, CFG, progress=False)
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert result.tokens == 30 * 4 * 16 and result.tokens_per_s > 0
    assert [g["lr"] for g in opt.param_groups] == [opt.cfg.lr]  # the peak learning rate is restored
    if isinstance(opt, Sophia):
        assert opt.hessian_updates == math.ceil(30 / 5)


def test_warmup_then_cosine_schedule():
    cfg = PretrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [cfg.lr_factor(s) for s in range(100)]
    assert factors[0] == 0.1 and factors[9] == 1.0 and factors[10] == 1.0
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # decays monotonically
    assert math.isclose(cfg.lr_factor(100), 0.1) and factors[-1] > 0.1


def test_windows_are_consecutive_tokens():
    ids = torch.arange(1000)
    batch = windows(ids, 8, 16, torch.Generator().manual_seed(0))
    assert batch.shape == (8, 17) and torch.all(batch[:, 1:] - batch[:, :-1] == 1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "steps=0"),
    (dict(batch_size=-1), "batch_size=-1"),
    (dict(seq_len=True), "seq_len=True"),
    (dict(steps=5, warmup_steps=6), "warmup_steps=6"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio=1.5"),
    (dict(max_grad_norm=0.0), "max_grad_norm=0.0"),
])
def test_bad_loop_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PretrainConfig(**kwargs)


def test_bad_loop_arguments_are_refused_by_name():
    model = tiny_llama()
    opt = AdamW(model.parameters())
    with pytest.raises(ValueError, match="1-D tensor of token ids"):
        pretrain(model, stream().float(), opt, CFG, progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        pretrain(model, stream(10), opt, CFG, progress=False)
    with pytest.raises(TypeError, match="trainer must be"):
        pretrain(model, stream(), "adamw", CFG, progress=False)
    with pytest.raises(TypeError, match="cfg must be a PretrainConfig"):
        pretrain(model, stream(), opt, dict(steps=3), progress=False)
    sophia_fp16 = MixedPrecision(tiny_llama(), lambda ps: Sophia(ps), MixedPrecisionConfig())
    with pytest.raises(ValueError, match="Sophia inside MixedPrecision"):
        pretrain(sophia_fp16.model, stream(), sophia_fp16, CFG, progress=False)
    other = MixedPrecision(tiny_llama(), lambda ps: AdamW(ps), MixedPrecisionConfig())
    with pytest.raises(ValueError, match="wraps another model"):
        pretrain(model, stream(), other, CFG, progress=False)
