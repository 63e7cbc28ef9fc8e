"""LLM-Pruner: physical removal equals zeroing the removed units, Taylor scores equal finite differences,
the pruned model runs (and generates) in both model classes, and bad arguments are refused."""

import copy

import pytest
import torch

from effref.eval import measure_generation
from effref.models import load_model
from effref.models.llama import Llama
from effref.pruning.llm_pruner import (
    LLMPrunerConfig,
    block_parts,
    llm_prune,
    ratio_for_fraction,
    removed_fraction,
    taylor_gradients,
    unit_scores,
)
from effref.pruning.recovery import lm_loss, lora_recover

BATCHES = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))


def _model(name, impl, dtype=torch.float32):
    hf = load_model(name, seed=7, dtype=dtype).model
    return Llama.from_hf(hf) if impl == "effref" else hf


def _logits(model, ids):
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def _zeroed_reference(model, shapes):
    """A copy of the unpruned model with the removed heads' o columns and channels' down columns set to 0."""
    ref = copy.deepcopy(model)
    blocks = ref.model.layers if hasattr(ref, "model") else ref.blocks
    for block, shape in zip(blocks, shapes):
        p = block_parts(block)
        dh = p.d_head
        if "kept_heads" in shape:
            gone = sorted(set(range(p.n_heads)) - set(shape["kept_heads"]))
            for h in gone:
                p.get("o").weight.data[:, h * dh:(h + 1) * dh] = 0
        if "kept_channels" in shape:
            gone = sorted(set(range(p.get("up").out_features)) - set(shape["kept_channels"]))
            p.get("down").weight.data[:, gone] = 0
    return ref


@pytest.mark.parametrize("impl", ["hf", "effref"])
@pytest.mark.parametrize("name, heads", [("tiny-llama", "query"), ("tiny-llama", "group"), ("tiny-llama-mha", "auto")])
def test_physical_removal_equals_zeroing_the_removed_units(impl, name, heads):
    model = _model(name, impl)
    original = copy.deepcopy(model)
    shapes = llm_prune(model, BATCHES, LLMPrunerConfig(0.5, heads=heads), progress=False)
    ref = _zeroed_reference(original, shapes)
    with torch.no_grad():
        torch.testing.assert_close(_logits(model, BATCHES), _logits(ref, BATCHES), rtol=1e-4, atol=1e-5)
    for block, shape in zip(model.model.layers if impl == "hf" else model.blocks, shapes):
        p = block_parts(block)
        dh = p.d_head
        assert p.get("q").out_features == p.get("o").in_features == shape["heads"] * dh
        assert p.get("k").out_features == p.get("v").out_features == shape["kv_heads"] * dh
        assert p.get("gate").out_features == p.get("up").out_features == p.get("down").in_features == shape["d_ff"]
        assert shape["heads"] % shape["kv_heads"] == 0
    expected = {"query": (2, 2), "group": (2, 1), "auto": (2, 2)}[heads]  # (heads, kv heads) left of (4, 2 or 4)
    assert (shapes[0]["heads"], shapes[0]["kv_heads"]) == expected and shapes[0]["d_ff"] == 64


@pytest.mark.parametrize("impl", ["hf", "effref"])
def test_pruned_model_is_smaller_and_generates_with_its_kv_cache(impl):
    model = _model("tiny-llama", impl)
    before = sum(p.numel() for p in model.parameters())
    cfg = LLMPrunerConfig(0.5, heads="group")
    predicted = removed_fraction(model, cfg)
    llm_prune(model, BATCHES, cfg, progress=False)
    after = sum(p.numel() for p in model.parameters())
    assert 1 - after / before == pytest.approx(predicted)
    result = measure_generation(model, BATCHES[:2, :8], new_tokens=5, warmup=1)
    assert result.output_ids.shape == (2, 13)


def test_vector_taylor_scores_equal_forward_mode_directional_derivatives():
    """|Σ w·g| of a head is the loss's rate of change towards removing it: checked with forward-mode AD
    (torch.func.jvp), independent of the backward pass that produced g."""
    from torch.func import functional_call, jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _model("tiny-llama", "effref", dtype=torch.float64)
    taylor_gradients(model, BATCHES, progress=False)
    q = model.blocks[0].attn.q_proj
    dh = model.blocks[0].attn.d_head
    scores = unit_scores(q, 0, dh, "vector")
    name = "blocks.0.attn.q_proj.weight"
    for h in range(q.out_features // dh):
        direction = torch.zeros_like(q.weight)
        direction[h * dh:(h + 1) * dh] = -q.weight.detach()[h * dh:(h + 1) * dh]  # towards removing head h
        with sdpa_kernel(SDPBackend.MATH):  # the math kernel supports forward-mode AD
            _, rate = jvp(lambda w: lm_loss(lambda ids: functional_call(model, {name: w}, (ids,)), BATCHES),
                          (q.weight.detach(),), (direction,))
        assert scores[h].item() == pytest.approx(abs(rate.item()), rel=1e-6)


def test_the_lowest_scoring_units_are_the_ones_removed():
    model = _model("tiny-llama", "hf")
    taylor_gradients(model, BATCHES, progress=False)
    mlp = model.model.layers[1].mlp
    score = sum(unit_scores(lin, d, 1, "vector") for lin, d in ((mlp.gate_proj, 0), (mlp.up_proj, 0), (mlp.down_proj, 1)))
    shapes = llm_prune(model, BATCHES, LLMPrunerConfig(0.25), progress=False)
    assert set(shapes[1]["kept_channels"]) == set(score.argsort(descending=True)[:96].tolist())


def test_ratio_for_fraction_lands_close_to_the_target_and_first_last_keep_blocks():
    model = _model("tiny-llama", "hf")
    cfg = ratio_for_fraction(model, 0.2)
    gap = abs(removed_fraction(model, cfg) - 0.2)
    assert gap < 0.03  # heads come in steps of a whole head per group, channels in steps of 1/128
    assert all(gap <= abs(removed_fraction(model, LLMPrunerConfig(r / 20)) - 0.2) for r in range(20))
    shapes = llm_prune(model, BATCHES, LLMPrunerConfig(0.5, first=1), progress=False)
    assert shapes[0] == {"heads": 4, "kv_heads": 2, "d_ff": 128} and shapes[1]["d_ff"] == 64


def test_lora_recovery_trains_merges_and_leaves_the_pruned_shapes():
    model = _model("tiny-llama", "effref")
    llm_prune(model, BATCHES, LLMPrunerConfig(0.5), progress=False)
    n = sum(p.numel() for p in model.parameters())
    text = torch.arange(64).repeat(40)  # a repetitive stream the adapters can learn quickly
    losses = lora_recover(model, text, steps=25, lr=1e-2, batch_size=4, seq_len=32, progress=False)
    assert losses[-1] < losses[0] - 0.5
    assert sum(p.numel() for p in model.parameters()) == n  # adapters merged and removed
    assert not any("lora" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 1.0}, r"ratio=1.0 must be in \[0, 1\)"), ({"ratio": -0.2}, r"must be in \[0, 1\)"),
    ({"heads": "kv"}, "heads='kv' is not known"), ({"importance": "hessian"}, "importance='hessian'"),
])
def test_config_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLMPrunerConfig(**kwargs)


def test_pruning_refuses_impossible_requests():
    with pytest.raises(ValueError, match="needs grouped-query attention"):
        llm_prune(_model("tiny-llama-mha", "hf"), BATCHES, LLMPrunerConfig(0.5, heads="query"), progress=False)
    with pytest.raises(ValueError, match="first=1, last=9"):
        llm_prune(_model("tiny-llama", "hf"), BATCHES, LLMPrunerConfig(0.5, first=1, last=9), progress=False)
    with pytest.raises(ValueError, match="different key/value head counts"):
        llm_prune(_model("tiny-llama", "effref"), BATCHES, LLMPrunerConfig(0.5, heads="group", first=1),
                  progress=False)


def test_precomputed_gradients_prune_a_copy_exactly_like_batches_do():
    dense = _model("tiny-llama", "hf")
    grads = taylor_gradients(dense, BATCHES, progress=False)
    copy_a, copy_b = copy.deepcopy(dense), copy.deepcopy(dense)
    shapes_a = llm_prune(copy_a, None, LLMPrunerConfig(0.5), gradients=grads, progress=False)
    shapes_b = llm_prune(copy_b, BATCHES, LLMPrunerConfig(0.5), progress=False)
    assert shapes_a == shapes_b
    with pytest.raises(ValueError, match="pass batches"):
        llm_prune(copy.deepcopy(dense), None, LLMPrunerConfig(0.5), progress=False)
