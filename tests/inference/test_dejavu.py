"""Deja Vu for SwiGLU MLP neurons and the model level: identities of the sparse MLP, oracle vs random,
FLOPs by hand and by torch's counter, predictors fitted on a random MLP, ``sparsified`` on a tiny model and
SmolLM2."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from effref.inference.dejavu import (
    SparseMLP,
    collect_inputs,
    fit_predictors,
    mlp_flops,
    neuron_importance,
    sparse_mlp,
    sparsified,
)
from effref.inference.dejavu_predictor import DejaVuConfig, keep_count, recall, train_predictor
from effref.models.llama import MLP, LlamaConfig


def _mlp(d: int = 16, d_ff: int = 48, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(LlamaConfig(d_model=d, d_ff=d_ff, n_layers=1, n_heads=2, n_kv_heads=2)).eval()


def test_all_neurons_selected_equals_dense_mlp_exactly():
    mlp, x = _mlp(), torch.randn(2, 5, 16)
    for selector in ("oracle", "random"):
        torch.testing.assert_close(SparseMLP(mlp, 48, selector)(x), mlp(x), rtol=0, atol=0)


def test_gathered_sparse_mlp_equals_masked_dense_mlp():
    mlp, x = _mlp(), torch.randn(6, 16)
    idx = torch.stack([torch.randperm(48, generator=torch.Generator().manual_seed(i))[:12] for i in range(6)])
    mask = torch.zeros(6, 48).scatter_(1, idx, 1.0)
    masked = mlp.down(torch.nn.functional.silu(mlp.gate(x)) * mlp.up(x) * mask)
    torch.testing.assert_close(sparse_mlp(mlp, x, idx), masked)
    torch.testing.assert_close(sparse_mlp(mlp, x, torch.arange(48).expand(6, 48)), mlp(x))


@pytest.mark.parametrize("k", [4, 12, 24, 40])
def test_oracle_top_k_beats_random_k(k):
    mlp, x = _mlp(), torch.randn(64, 16)
    dense = mlp(x)
    err = {s: (SparseMLP(mlp, k, s, generator=torch.Generator().manual_seed(0))(x) - dense).norm().item()
           for s in ("oracle", "random")}
    assert err["oracle"] <= err["random"]


def test_flop_accounting_matches_a_hand_count_and_torch_counter():
    d, d_ff, k, r = 16, 48, 12, 4
    counts = mlp_flops(d, d_ff, k, rank=r)
    assert counts == {"dense": 2 * 3 * 16 * 48, "sparse": 2 * 3 * 16 * 12, "predictor": 2 * 4 * (16 + 48)}
    mlp, x = _mlp(d, d_ff), torch.randn(1, d)
    with FlopCounterMode(display=False) as counter:
        mlp(x)
    assert counter.get_total_flops() == counts["dense"]
    with FlopCounterMode(display=False) as counter:
        sparse_mlp(mlp, x, torch.arange(k)[None])
    assert counter.get_total_flops() == counts["sparse"]


def test_predictor_on_a_random_swiglu_mlp_beats_chance():
    mlp = _mlp(d=16, d_ff=64)
    g = torch.Generator().manual_seed(1)
    x_train, x_test = torch.randn(512, 16, generator=g), torch.randn(256, 16, generator=g)
    predictor = train_predictor(x_train, neuron_importance(mlp, x_train), DejaVuConfig(rank=8))
    got = recall(predictor(x_test), neuron_importance(mlp, x_test), keep_count(0.25, 64))
    assert got > 0.25 + 0.1  # chance recall of a random k-subset is k / d_ff = 0.25 (fixed seeds)


def test_sparsified_model_keeps_dense_logits_at_keep_one_and_restores_mlps(tiny_llama, random_ids):
    model, ids = tiny_llama(), random_ids(2, 12)
    originals = [b.mlp for b in model.blocks]
    with torch.no_grad():
        dense = model(ids)
        predictors = fit_predictors(model, ids, DejaVuConfig(rank=4))
        with sparsified(model, 1.0, "predictor", predictors):
            torch.testing.assert_close(model(ids), dense, rtol=0, atol=0)
        with sparsified(model, 0.25, "oracle", layers=[1]):
            assert isinstance(model.blocks[1].mlp, SparseMLP) and model.blocks[0].mlp is originals[0]
            assert not torch.equal(model(ids), dense)
    assert [b.mlp for b in model.blocks] == originals


@pytest.mark.parametrize("make, message", [
    (lambda: sparse_mlp(_mlp(), torch.randn(2, 3, 16), torch.zeros(2, 4, dtype=torch.long)), "must be"),
    (lambda: SparseMLP(_mlp(), 4, "magic"), "selector='magic'"),
    (lambda: SparseMLP(_mlp(), 4, "predictor"), "needs a trained predictor"),
    (lambda: collect_inputs(None, None, ("ffn",)), "parts=\\('ffn',\\)"),
])
def test_bad_input_is_reported(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_wrong_number_of_predictors_or_part_is_reported(tiny_llama):
    model = tiny_llama()
    with pytest.raises(ValueError, match="predictors for 3 blocks"), sparsified(model, 0.5, predictors=[None]):
        pass
    with pytest.raises(ValueError, match="part='ffn'"), sparsified(model, 0.5, "oracle", part="ffn"):
        pass


@pytest.mark.slow
def test_smollm2_oracle_half_keeps_perplexity_and_predictor_sits_between_oracle_and_random() -> None:
    import effref
    if not effref.assets.is_available("smollm2-135m"):
        pytest.skip("SmolLM2-135M is not fetched (python -m effref.assets fetch smollm2-135m)")
    from effref.data import load_corpus, tokenize
    from effref.models import load_model
    model, tokenizer, _ = load_model("smollm2-135m", impl="effref")
    text = load_corpus("austen")
    calib = tokenize(tokenizer, text.train[:20_000])[None, :256]
    ids = tokenize(tokenizer, text.test[:20_000])[None, :128]

    def nll() -> float:
        return torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:]).item()

    with torch.no_grad():
        dense = nll()
        predictors = fit_predictors(model, calib, DejaVuConfig(rank=32))
        got = {}
        for selector in ("oracle", "predictor", "random"):
            with sparsified(model, 0.5, selector, predictors):
                got[selector] = nll()
    assert got["oracle"] < dense + 0.15  # half the neurons, chosen with hindsight: within ~16% perplexity
    assert got["oracle"] < got["predictor"] < got["random"]
