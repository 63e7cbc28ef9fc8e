"""LoSparse: low-rank part = truncated SVD, sparse part = the largest residual entries, forward = dense math."""

import pytest
import torch

from effref.compression.calibration import InputStats
from effref.lowrank.losparse import LoSparseLinear, losparse_factorize
from effref.lowrank.svd import truncated_svd


def _linear(seed=0, out=24, inp=32):
    lin = torch.nn.Linear(inp, out, bias=False)
    lin.weight.data = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    return lin


def test_element_sparse_part_holds_the_largest_residual_entries():
    lin = _linear()
    layer = losparse_factorize(lin, rank=4, sparse_fraction=0.1)
    B, A, _ = truncated_svd(lin.weight.detach(), 4)
    R = lin.weight.detach() - B @ A
    S = layer.sparse_weight()
    k = round(0.1 * R.numel())
    assert int((S != 0).sum()) == k
    assert set(torch.nonzero(S.reshape(-1)).flatten().tolist()) == set(R.abs().reshape(-1).topk(k).indices.tolist())
    torch.testing.assert_close(layer.low_rank.weight_product(), B @ A)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(layer(x), x @ (B @ A + S).T, rtol=1e-5, atol=1e-5)  # sparse matmul = dense math
    assert sum(p.numel() for p in layer.parameters()) == 4 * (24 + 32) + k


def test_activation_weighted_columns_and_full_residual():
    lin = _linear(1)
    norms = torch.rand(32, generator=torch.Generator().manual_seed(2)) + 0.1
    layer = losparse_factorize(lin, 3, 0.25, "column", InputStats(sq_mean=norms.pow(2)))
    B, A, _ = truncated_svd(lin.weight.detach(), 3)
    R = lin.weight.detach() - B @ A
    expected = set((R.norm(dim=0) * norms).topk(8).indices.tolist())
    assert set(layer.index.tolist()) == expected
    assert sum(p.numel() for p in layer.parameters()) == 3 * (24 + 32) + 24 * 8
    everything = losparse_factorize(lin, 3, 1.0)  # the whole residual kept: W exactly
    x = torch.randn(4, 32)
    torch.testing.assert_close(everything(x), lin(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 40, "sparse_fraction": 0.1}, "rank=40"), ({"rank": 4, "sparse_fraction": 1.5}, "sparse_fraction=1.5"),
    ({"rank": 4, "sparse_fraction": 0.1, "structure": "row"}, "structure='row'")])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        losparse_factorize(_linear(), **kwargs)
    with pytest.raises(ValueError, match="n_sparse=99"):
        LoSparseLinear(8, 4, 2, 99, "column")


@pytest.mark.parametrize("impl", ["hf", "effref"])
def test_model_level_full_residual_is_function_preserving(impl):
    from effref.lowrank.losparse import losparse_compress_model
    from effref.models import load_model
    from effref.models.llama import Llama

    hf = load_model("tiny-llama", seed=6).model
    model = Llama.from_hf(hf) if impl == "effref" else hf
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        ref = ref if isinstance(ref, torch.Tensor) else ref.logits
        ranks = losparse_compress_model(model, 0.2, 1.0, progress=False)  # S keeps the whole residual
        out = model(ids)
        out = out if isinstance(out, torch.Tensor) else out.logits
    assert len(ranks) == 14 and sum(isinstance(m, LoSparseLinear) for m in model.modules()) == 14
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
