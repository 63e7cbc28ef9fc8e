"""Deja Vu for attention heads: identities of the sparse attention, head importance by ablation, oracle vs
random heads, kv heads needed and attention FLOPs by brute force, head predictors in a sparsified model."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from effref.inference.dejavu import collect_inputs, fit_predictors, sparsified
from effref.inference.dejavu_heads import (
    SparseAttention,
    attention_flops,
    head_contributions,
    head_importance,
    head_outputs,
    kv_heads_needed,
    sparse_attention,
)
from effref.inference.dejavu_predictor import DejaVuConfig, recall, top_k_mask
from effref.models.llama import Attention, LlamaConfig, rope_tables


def _attn(d: int = 16, n_heads: int = 4, n_kv_heads: int = 2, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    return Attention(LlamaConfig(d_model=d, d_ff=32, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv_heads), 0).eval()


def _rope(attn: Attention, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_tables(attn.d_head, T, 10_000.0)


def test_all_heads_kept_equals_dense_attention_exactly():
    attn, x = _attn(), torch.randn(2, 7, 16)
    cos, sin = _rope(attn, 7)
    dense = attn(x, cos, sin)
    for selector in ("oracle", "random"):
        torch.testing.assert_close(SparseAttention(attn, 4, selector)(x, cos, sin), dense, rtol=0, atol=0)
    torch.testing.assert_close(sparse_attention(attn, x, cos, sin, torch.arange(4)), dense)
    torch.testing.assert_close(head_contributions(attn, head_outputs(attn, x, cos, sin)).sum(2), dense)


@pytest.mark.parametrize("heads", [[0], [1, 2], [0, 1], [3, 0, 2]])
def test_gathered_sparse_attention_equals_masked_dense_heads(heads):
    attn, x = _attn(), torch.randn(2, 6, 16)
    cos, sin = _rope(attn, 6)
    y = head_outputs(attn, x, cos, sin)  # (B, T, 4, d_head), every head
    mask = torch.zeros(4).index_fill_(0, torch.tensor(heads), 1.0)
    masked = attn.o_proj((y * mask[:, None]).flatten(2))
    torch.testing.assert_close(sparse_attention(attn, x, cos, sin, torch.tensor(heads)), masked)


def test_head_importance_equals_ablation_brute_force():
    """c_h = ‖dense output − output with head h's o_proj columns zeroed‖, one ablated copy per head."""
    attn, x = _attn(), torch.randn(2, 5, 16)
    cos, sin = _rope(attn, 5)
    dense, brute = attn(x, cos, sin), []
    for h in range(4):
        ablated = _attn()
        with torch.no_grad():
            ablated.o_proj.weight[:, h * attn.d_head:(h + 1) * attn.d_head] = 0
        brute.append((dense - ablated(x, cos, sin)).norm(dim=-1))
    torch.testing.assert_close(head_importance(attn, x, cos, sin), torch.stack(brute, -1))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_oracle_heads_beat_random_heads(k):
    attn, x = _attn(), torch.randn(4, 16, 16)
    cos, sin = _rope(attn, 16)
    dense = attn(x, cos, sin)
    err = {s: (SparseAttention(attn, k, s, generator=torch.Generator().manual_seed(0))(x, cos, sin) - dense
               ).norm().item() for s in ("oracle", "random")}
    assert err["oracle"] < err["random"]


def test_kv_heads_needed_matches_brute_force():
    mask = top_k_mask(torch.randn(50, 9, generator=torch.Generator().manual_seed(2)), 4)
    brute = torch.tensor([float(len({h // 3 for h in row.nonzero()[:, 0].tolist()})) for row in mask])
    torch.testing.assert_close(kv_heads_needed(mask, 3), brute)


def test_attention_flops_match_a_hand_count_and_torch_counter():
    from torch.nn.attention import (  # the math backend shows its products to the counter
        SDPBackend,
        sdpa_kernel,
    )
    d, d_head, T = 16, 4, 6
    # 2 kept query heads: q and o 2·2·16·4 each, scores and values 2·2·6·4 each; 1 kv head: k and v 2·2·16·4
    got = attention_flops(d, d_head, 4, 2, k=2, kv_needed=1, context=T, rank=3)
    assert got == {"dense": 4 * (4 * 4 * (16 + 6)) + 2 * 4 * 16 * 4, "sparse": 2 * 4 * 4 * (16 + 6) + 4 * 16 * 4,
                   "predictor": 2 * 3 * (16 + 4)}
    attn, x = _attn(d), torch.randn(1, T, d)
    cos, sin = _rope(attn, T)
    for heads, kv in (([0, 1], 1), ([0, 2], 2), ([0, 1, 2, 3], 2)):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            sparse_attention(attn, x, cos, sin, torch.tensor(heads))
        assert counter.get_total_flops() == T * attention_flops(d, d_head, 4, 2, len(heads), kv, T)["sparse"]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        attn(x, cos, sin)
    assert counter.get_total_flops() == T * attention_flops(d, d_head, 4, 2, 4, 2, T)["dense"]


def test_head_predictor_recall_against_brute_force_and_sparsified_heads(tiny_llama, random_ids):
    model, ids, held_out = tiny_llama(), random_ids(8, 64), random_ids(4, 32, seed=7)
    originals = [b.attn for b in model.blocks]
    with torch.no_grad():
        dense = model(ids)
        predictors = fit_predictors(model, ids, DejaVuConfig(rank=4), part="attn")
        recalls = []
        for block, p, (x, cos, sin) in zip(model.blocks, predictors, collect_inputs(model, held_out, ("attn",))["attn"]):
            scores, true = p(x).flatten(0, 1), head_importance(block.attn, x, cos, sin).flatten(0, 1)
            brute = sum(len(set(s.topk(2).indices.tolist()) & set(t.topk(2).indices.tolist())) / 2
                        for s, t in zip(scores, true)) / len(true)
            assert recall(scores, true, 2) == pytest.approx(brute)
            recalls.append(recall(scores, true, 1))
        # chance is k / n_heads = 1/4; a random model's heads depend mostly on context, so the margin is small
        assert sum(recalls) / len(recalls) > 0.25 + 0.05  # (fixed seeds; measured 0.37)
        shared = collect_inputs(model, ids, ("mlp", "attn"))  # one forward for both parts, same predictors
        for part, fitted in (("attn", predictors), ("mlp", fit_predictors(model, ids, DejaVuConfig(rank=4)))):
            for p, q in zip(fit_predictors(model, shared, DejaVuConfig(rank=4), part), fitted):
                torch.testing.assert_close(p.B.weight, q.B.weight, rtol=0, atol=0)
        with sparsified(model, 1.0, "predictor", predictors, part="attn"):
            torch.testing.assert_close(model(ids), dense, rtol=0, atol=0)
            with pytest.raises(ValueError, match="without a KV cache"):
                model(ids, model.new_cache(8, 64))
        with sparsified(model, 0.5, "oracle", layers=[1], part="attn"):
            assert isinstance(model.blocks[1].attn, SparseAttention) and model.blocks[0].attn is originals[0]
            assert not torch.equal(model(ids), dense)
    assert [b.attn for b in model.blocks] == originals


@pytest.mark.parametrize("make, message", [
    (lambda: sparse_attention(_attn(), torch.randn(2, 16), *_rope(_attn(), 2), torch.tensor([0])), "must be"),
    (lambda: sparse_attention(_attn(), torch.randn(1, 2, 16), *_rope(_attn(), 2), torch.tensor([1, 1])), "distinct"),
    (lambda: sparse_attention(_attn(), torch.randn(1, 2, 16), *_rope(_attn(), 2), torch.tensor([4])), r"\[0, 4\)"),
    (lambda: SparseAttention(_attn(), 2, "magic"), "selector='magic'"),
])
def test_bad_input_is_reported(make, message):
    with pytest.raises(ValueError, match=message):
        make()
