"""TensorGPT's TT-SVD: exact at full ranks, error = discarded energy, lookups = rows of the full table."""

import math

import pytest
import torch

from effref.lowrank.tensor_train import TTEmbedding, tt_compress_embedding, tt_parameter_count, tt_svd
from effref.models import load_model
from effref.models.llama import Llama


def _full_contraction(cores, row):
    """Rebuild one row by multiplying core slices index by index (a slow, independent path)."""
    dims = [c.shape[2] for c in cores]
    out = torch.empty(math.prod(dims), dtype=cores[0].dtype)
    for flat, idx in enumerate(torch.cartesian_prod(*[torch.arange(d) for d in dims]).reshape(-1, len(dims))):
        m = torch.ones(1, 1, dtype=cores[0].dtype)
        for c, i in zip(cores, idx):
            m = m @ c[row, :, i, :]
        out[flat] = m[0, 0]
    return out


@pytest.mark.parametrize("dims, full", [((4, 6), (4,)), ((2, 3, 4), (2, 4)), ((3, 2, 2, 2), (3, 4, 2))])
def test_full_ranks_reconstruct_exactly(dims, full):
    rows = torch.randn(5, math.prod(dims), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cores, discarded = tt_svd(rows, dims, full)
    emb = TTEmbedding(5, dims, full).double()
    with torch.no_grad():
        for p, c in zip(emb.cores, cores):
            p.copy_(c)
    torch.testing.assert_close(emb.reconstruct(), rows)
    torch.testing.assert_close(_full_contraction(cores, 3), rows[3])
    assert torch.all(discarded < 1e-20)


def test_truncation_error_is_exactly_the_discarded_singular_values():
    rows = torch.randn(7, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    emb = TTEmbedding.from_weight(rows, (4, 4, 3), (2, 3))
    _, discarded = tt_svd(rows, (4, 4, 3), (2, 3))
    err = (emb.reconstruct() - rows).pow(2).sum(-1)
    torch.testing.assert_close(err, discarded)
    ids = torch.tensor([[6, 0, 2], [2, 2, 5]])
    torch.testing.assert_close(emb(ids), emb.reconstruct()[ids])  # lookups are rows of the (virtual) table


def test_parameter_count_matches_the_formula():
    emb = TTEmbedding(100, (8, 8, 9), (3, 4))
    assert sum(p.numel() for p in emb.parameters()) == tt_parameter_count(100, (8, 8, 9), (3, 4)) \
        == 100 * (1 * 8 * 3 + 3 * 8 * 4 + 4 * 9 * 1)


@pytest.mark.parametrize("impl", ["hf", "effref"])
def test_full_rank_embedding_replacement_keeps_the_model_outputs(impl):
    hf = load_model("tiny-llama", seed=2).model
    model = Llama.from_hf(hf) if impl == "effref" else hf
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        ref = ref if isinstance(ref, torch.Tensor) else ref.logits
        tt_compress_embedding(model, (8, 8), (8,))
        out = model(ids)
        out = out if isinstance(out, torch.Tensor) else out.logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    head = model.lm_head.weight
    assert head.shape == (256, 64)  # the output head keeps its dense table


@pytest.mark.parametrize("dims, ranks, message", [
    ((8, 8), (4,), "product is the embedding width 48"), ((48,), (), ">= 2 positive factors"),
    ((4, 4, 3), (2,), "len\\(dims\\) - 1 = 2"), ((4, 4, 3), (5, 2), r"ranks\[0\]=5 must be in \[1, 4\]"),
    ((4, 4, 3), (4, 4), r"ranks\[1\]=4 must be in \[1, 3\]")])
def test_bad_shapes_and_ranks_are_clear_errors(dims, ranks, message):
    with pytest.raises(ValueError, match=message):
        tt_svd(torch.randn(3, 48), dims, ranks)


def test_a_scaled_embedding_keeps_its_scale():
    # Gemma multiplies looked-up rows by sqrt(d_model): the TT table must too, or every logit changes
    import transformers

    torch.manual_seed(0)
    model = transformers.GemmaForCausalLM(transformers.GemmaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16)).eval()
    ids = torch.arange(64)[None]
    dense = model.get_input_embeddings()(ids)
    tt = tt_compress_embedding(model, (8, 8), (8,))  # full rank: exact up to rounding
    assert tt.scale == pytest.approx(64 ** 0.5, rel=1e-6)
    torch.testing.assert_close(model.get_input_embeddings()(ids), dense, rtol=1e-4, atol=1e-4)
