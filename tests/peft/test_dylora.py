"""DyLoRA: truncated forward equals a plain LoRA of rank b, uniform rank sampling, all ranks work after training."""

import copy

import pytest
import torch
from scipy import stats

from effref.finetune import evaluate, toy_task, train
from effref.models import load_model
from effref.peft.core import merge_adapters, unmerge_adapters
from effref.peft.dylora import DyLoraConfig, DyLoraLinear, apply_dylora, sample_rank, set_rank
from effref.peft.lora import LoraConfig, LoraLinear, apply_lora


def tiny():
    return load_model("tiny-llama", seed=0).model


def ids():
    return torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))


def test_rank_b_equals_plain_lora_built_from_the_first_b_components():
    base = tiny()
    dy = apply_dylora(copy.deepcopy(base), DyLoraConfig(r=8, alpha=16))
    with torch.no_grad():
        for m in dy.modules():
            if isinstance(m, DyLoraLinear):
                m.lora_B.weight.normal_()
    for b in (1, 3, 8):
        set_rank(dy, b)
        plain = apply_lora(copy.deepcopy(base), LoraConfig(r=b, alpha=16))
        with torch.no_grad():
            for name, m in plain.named_modules():
                if isinstance(m, LoraLinear):
                    src = dy.get_submodule(name)
                    m.lora_A.weight.copy_(src.lora_A.weight[:b])
                    m.lora_B.weight.copy_(src.lora_B.weight[:, :b])
        torch.testing.assert_close(dy(ids()).logits, plain(ids()).logits)
        before = {n: p.clone() for n, p in dy.named_parameters()}
        out = dy(ids()).logits
        merge_adapters(dy, DyLoraLinear)
        torch.testing.assert_close(dy(ids()).logits, out, rtol=1e-5, atol=1e-5)
        unmerge_adapters(dy, DyLoraLinear)
        assert all(torch.equal(p, before[n]) for n, p in dy.named_parameters())


def test_sampled_ranks_are_uniform_chi_square():
    model = apply_dylora(tiny(), DyLoraConfig(r=6, r_min=2))
    g = torch.Generator().manual_seed(0)
    draws = [sample_rank(model, g) for _ in range(2500)]
    counts = [draws.count(b) for b in range(2, 7)]
    assert min(draws) == 2 and max(draws) == 6
    # false-failure rate of this check under a correct sampler: 0.1 %
    assert stats.chisquare(counts).pvalue > 1e-3
    assert all(m.active_rank == draws[-1] for m in model.modules() if isinstance(m, DyLoraLinear))


def test_every_rank_is_usable_after_dynamic_training():
    torch.manual_seed(0)
    task = toy_task()
    model = apply_dylora(tiny(), DyLoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj", "down_proj")))
    g = torch.Generator().manual_seed(0)
    train(model, task, steps=40, lr=1e-2, batch_size=16, before_step=lambda step: sample_rank(model, g),
          progress=False)
    accuracy = {}
    for b in (1, 2, 4, 8):
        set_rank(model, b)
        accuracy[b] = evaluate(model, task)
    assert min(accuracy.values()) > 1 / 3, accuracy  # twice chance (1/6) at every rank


@pytest.mark.parametrize("rank, match", [(0, "outside the trained range"), (9, r"outside the trained range \[1, 8\]")])
def test_set_rank_rejects_ranks_outside_the_range(rank, match):
    with pytest.raises(ValueError, match=match):
        set_rank(apply_dylora(tiny(), DyLoraConfig(r=8)), rank)


def test_dylora_config_rejects_bad_range():
    with pytest.raises(ValueError, match="r_min=5, r=4"):
        DyLoraConfig(r=4, r_min=5)
