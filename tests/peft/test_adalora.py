"""AdaLoRA: SVD-form layer vs peft, budget schedule, importance scores by hand, masking, orthogonality."""

import copy
import itertools

import pytest
import torch
from torch import nn

from effref.eval import parameter_count
from effref.models import load_model
from effref.peft.adalora import (
    AdaLoraConfig,
    RankAllocator,
    SVDLinear,
    apply_adalora,
    budget,
    orthogonal_regulariser,
)
from effref.peft.core import merge_adapters, unmerge_adapters

peft = pytest.importorskip("peft")


def tiny():
    return load_model("tiny-llama", seed=0).model


def ids():
    return torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))


def test_svd_layer_matches_peft_adalora_and_counts():
    base = tiny()
    cfg = AdaLoraConfig(init_r=6, target_r=4, alpha=12, total_steps=50)
    ours = apply_adalora(copy.deepcopy(base), cfg)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(
        init_r=6, target_r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"], total_step=50, lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    for name, module in theirs.named_modules():
        if isinstance(module, peft.tuners.adalora.AdaLoraLayer):
            mine = ours.get_submodule(name.removeprefix("base_model.model."))
            with torch.no_grad():
                mine.lora_E.copy_(torch.randn(6, generator=g))
                module.lora_A["default"].copy_(mine.lora_A)
                module.lora_B["default"].copy_(mine.lora_B)
                module.lora_E["default"].copy_(mine.lora_E[:, None])
    # peft divides by (rank + 1e-5) instead of rank: a relative difference of ~2e-6 in the update
    torch.testing.assert_close(ours(ids()).logits, theirs(ids()).logits, rtol=1e-4, atol=1e-4)
    assert parameter_count(ours, trainable_only=True) == theirs.get_nb_trainable_parameters()[0]


def test_adalora_is_identity_at_init_and_merge_unmerge_exact():
    base = tiny()
    model = apply_adalora(copy.deepcopy(base), AdaLoraConfig())
    torch.testing.assert_close(model(ids()).logits, base(ids()).logits)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SVDLinear):
                m.lora_E.normal_()
    before = {n: p.clone() for n, p in model.named_parameters()}
    out = model(ids()).logits
    merge_adapters(model, SVDLinear)
    torch.testing.assert_close(model(ids()).logits, out, rtol=1e-5, atol=1e-5)
    unmerge_adapters(model, SVDLinear)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_budget_schedule_is_cubic_between_warmup_and_final_phase():
    cfg = AdaLoraConfig(init_r=12, target_r=4, total_steps=100, t_init=10, t_final=30)
    n = 5
    assert budget(0, cfg, n) == budget(9, cfg, n) == 60
    assert budget(70, cfg, n) == budget(99, cfg, n) == 20
    assert budget(40, cfg, n) == int(20 + 40 * (1 - 30 / 60) ** 3)
    values = [budget(t, cfg, n) for t in range(100)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_importance_scores_follow_the_smoothing_equations():
    layer = SVDLinear(nn.Linear(5, 4), r=3, alpha=3)
    model = nn.Sequential(layer)
    cfg = AdaLoraConfig(init_r=3, target_r=1, total_steps=20, t_init=0, t_final=5, delta_t=1, beta1=0.5, beta2=0.25)
    alloc = RankAllocator(model, cfg)
    grads = []
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        for p in (layer.lora_A, layer.lora_E, layer.lora_B):
            p.grad = torch.randn(p.shape, generator=g)
        grads.append({k: (p.detach() * p.grad).abs() for k, p in
                      (("A", layer.lora_A), ("E", layer.lora_E), ("B", layer.lora_B))})
        scores = alloc.triplet_scores()["0"]

    def smooth(k):
        i1 = 0.5 * grads[0][k]
        u1 = 0.75 * (grads[0][k] - i1).abs()
        i2 = 0.5 * i1 + 0.5 * grads[1][k]
        u2 = 0.25 * u1 + 0.75 * (grads[1][k] - i2).abs()
        return i2 * u2

    expected = smooth("E") + smooth("B").mean(0) + smooth("A").mean(1)
    torch.testing.assert_close(scores, expected)


def test_reallocation_keeps_exactly_the_top_budget_triplets_across_layers():
    model = apply_adalora(tiny(), AdaLoraConfig(init_r=6, target_r=2, total_steps=40, t_init=0, t_final=10,
                                                delta_t=1))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SVDLinear):
                m.lora_E.normal_()
    alloc_cfg = AdaLoraConfig(init_r=6, target_r=2, total_steps=40, t_init=0, t_final=10, delta_t=1)
    alloc = RankAllocator(model, alloc_cfg)
    model(ids(), labels=ids()).loss.backward()
    step = 15
    scores = {k: v.clone() for k, v in RankAllocator(model, alloc_cfg).triplet_scores().items()}
    b = alloc.update(step)
    assert b == budget(step, alloc_cfg, 4) < 24
    flat = torch.cat(list(scores.values()))
    kept = {(name, i) for name, s in scores.items() for i in range(6) if s[i] >= flat.topk(b).values[-1]}
    nonzero = {(name, i) for name, m in alloc.layers.items() for i in range(6) if m.lora_E[i] != 0}
    assert nonzero == kept and len(kept) == b
    assert sum(alloc.ranks().values()) == b


def test_orthogonal_regulariser_is_zero_for_orthonormal_factors_and_pushes_towards_them():
    layer = SVDLinear(nn.Linear(16, 12), r=4, alpha=4)
    model = nn.Sequential(layer)
    with torch.no_grad():
        layer.lora_B.copy_(torch.linalg.qr(torch.randn(12, 4))[0])
        layer.lora_A.copy_(torch.linalg.qr(torch.randn(16, 4))[0].T)
    assert orthogonal_regulariser(model, 1.0).item() < 1e-10
    layer.lora_A.data += 0.3 * torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    start = orthogonal_regulariser(model, 1.0).item()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        orthogonal_regulariser(model, 1.0).backward()
        opt.step()
    assert orthogonal_regulariser(model, 1.0).item() < 0.01 * start


@pytest.mark.parametrize("kwargs, match", [
    ({"init_r": 4, "target_r": 6}, "need 0 < target_r <= init_r"),
    ({"t_init": 50, "t_final": 50}, "must be < total_steps"),
    ({"delta_t": 0}, "delta_t=0"),
])
def test_adalora_config_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaLoraConfig(**kwargs)


def test_adalora_rejects_rank_above_layer_and_missing_grads():
    with pytest.raises(ValueError, match="init_r=65"):
        apply_adalora(tiny(), AdaLoraConfig(init_r=65, target_r=8, target_modules=("q_proj",)))
    model = apply_adalora(tiny(), AdaLoraConfig())
    with pytest.raises(RuntimeError, match="after backward"):
        RankAllocator(model, AdaLoraConfig()).update(0)
