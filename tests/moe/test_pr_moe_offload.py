"""PR-MoE against its written-out formula; offloaded experts against the in-memory model and an LRU replay."""

import pytest
import torch

from effref.moe import Mixtral, MixtralConfig, moe_layers
from effref.moe.offload import OffloadedExperts, lru_misses, offload_experts
from effref.moe.pr_moe import ResidualMoE, pr_moe


def cfg(**kw):
    base = {"vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "d_ff": 48,
            "n_experts": 4, "top_k": 1, "max_seq_len": 64}
    return MixtralConfig(**(base | kw))


def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
    return model


def test_residual_moe_is_the_dense_mlp_plus_one_gated_expert():
    layer = randomise(ResidualMoE(16, 24, n_experts=3))
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    y = layer(x).view(10, 16)
    flat = x.view(10, 16)
    w = layer.moe.router.gate.weight
    for t in range(10):  # token by token: silu-gated MLP plus p_e · expert e, e = argmax of the router
        mlp = lambda W, v: (torch.nn.functional.silu(W.gate[0] @ v) * (W.up[0] @ v)) @ W.down[0].T  # noqa: E731
        p = torch.softmax(w @ flat[t], -1)
        e = int(p.argmax())
        ex = layer.moe.experts
        expert = (torch.nn.functional.silu(ex.gate[e] @ flat[t]) * (ex.up[e] @ flat[t])) @ ex.down[e].T
        torch.testing.assert_close(y[t], mlp(layer.dense, flat[t]) + p[e] * expert, rtol=1e-5, atol=1e-5)


def test_pyramid_has_the_requested_experts_and_counts_active_parameters():
    model = pr_moe(cfg(), (2, 6))
    assert [layer.experts.n_experts for layer in moe_layers(model)] == [2, 6]
    per_expert = 3 * 32 * 48
    assert model.active_parameters() == model.num_parameters() - (1 + 5) * per_expert  # dense + 1 expert active
    logits = model(torch.randint(0, 256, (2, 9)))
    assert logits.shape == (2, 9, 256) and model.aux_loss() > 0


def test_pyramid_needs_one_count_per_layer():
    with pytest.raises(ValueError, match="experts_per_layer has 3 entries"):
        pr_moe(cfg(), (2, 4, 8))
    with pytest.raises(ValueError, match="n_experts=0"):
        pr_moe(cfg(), (2, 0))


def test_offloaded_model_generates_the_same_tokens_and_misses_as_lru_predicts(tmp_path):
    model = randomise(Mixtral(cfg())).eval()
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    reference = model.generate(prompt, 24)
    traces = [[] for _ in moe_layers(model)]
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: traces[i].extend(sorted(set(m.routing.expert.tolist()))))
             for i, layer in enumerate(moe_layers(model))]
    banks = offload_experts(model, tmp_path, slots=2)
    assert torch.equal(model.generate(prompt, 24), reference)
    for h in hooks:
        h.remove()
    assert [b.misses for b in banks] == [lru_misses(t, 2) for t in traces]
    assert all(b.hits + b.misses == len(t) for b, t in zip(banks, traces))
    assert all(b.bytes_read == b.misses * 3 * 32 * 48 * 4 for b in banks) and sum(b.hits for b in banks) > 0


def test_lru_replay_by_hand():
    assert lru_misses([0, 1, 0, 2, 1, 0], slots=2) == 5  # 0 1 (hit 0) 2 evicts 1, 1 evicts 0, 0 evicts 2
    assert lru_misses([0, 1, 0, 2, 1, 0], slots=3) == 3


@pytest.mark.parametrize("call, message", [
    (lambda m, d: offload_experts(m, d, slots=0), "slots=0"),
    (lambda m, d: offload_experts(m, d, slots=5), "slots=5"),
    (lambda m, d: lru_misses([1], slots=0), "slots=0"),
    (lambda m, d: offload_experts(torch.nn.Linear(2, 2), d, slots=1), "no MoE layers"),
])
def test_bad_arguments_are_refused(tmp_path, call, message):
    with pytest.raises(ValueError, match=message):
        call(Mixtral(cfg()), tmp_path)


def test_offloading_twice_is_refused(tmp_path):
    model = Mixtral(cfg())
    offload_experts(model, tmp_path / "a", slots=1)
    with pytest.raises(ValueError, match="offload a model once"):
        offload_experts(model, tmp_path / "b", slots=1)
    assert isinstance(moe_layers(model)[0].experts, OffloadedExperts)
