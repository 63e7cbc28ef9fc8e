"""Truncated SVD: Eckart–Young against numpy's SVD, whitening against the output error, counts, bad ranks."""

import numpy as np
import pytest
import torch

from effref.compression.calibration import InputStats
from effref.lowrank.svd import LowRankLinear, rank_for_ratio, svd_compress_model, svd_factorize, truncated_svd
from effref.models import load_model
from effref.models.llama import Llama


@pytest.mark.parametrize("shape, rank", [((20, 30), 1), ((20, 30), 7), ((30, 20), 19), ((16, 16), 16)])
def test_error_equals_the_tail_singular_values(shape, rank):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    B, A, _ = truncated_svd(W, rank)
    sigma = np.linalg.svd(W.numpy(), compute_uv=False)  # an independent SVD
    err = W - B @ A
    assert torch.linalg.matrix_norm(err).item() ** 2 == pytest.approx(float((sigma[rank:] ** 2).sum()), abs=1e-9)
    spectral = torch.linalg.matrix_norm(err, ord=2).item()
    assert spectral == pytest.approx(float(sigma[rank]) if rank < len(sigma) else 0.0, abs=1e-9)


def test_whitened_svd_minimises_output_error_to_the_tail_of_W_S():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    W = torch.randn(16, 24, generator=g, dtype=torch.float64)
    H = X.T @ X / 400
    B, A, _sigma = truncated_svd(W, 5, hessian=H, damp=0.0)
    out_err = ((W - B @ A) @ X.T).pow(2).sum().item() / 400  # ||(W − Ŵ) Xᵀ||² / n
    S = np.linalg.cholesky(H.numpy())
    tail = np.linalg.svd(W.numpy() @ S, compute_uv=False)[5:]
    assert out_err == pytest.approx(float((tail ** 2).sum()), rel=1e-8)
    B0, A0, _ = truncated_svd(W, 5)
    assert out_err < ((W - B0 @ A0) @ X.T).pow(2).sum().item() / 400  # plain SVD ignores the inputs


def test_parameter_count_matches_the_formula_and_the_layer_matches_its_factors():
    lin = torch.nn.Linear(48, 32, bias=True)
    low = svd_factorize(lin, 10)
    assert sum(p.numel() for p in low.parameters()) == 10 * (48 + 32) + 32
    x = torch.randn(3, 48)
    torch.testing.assert_close(low(x), x @ low.weight_product().T + lin.bias)
    assert rank_for_ratio(32, 48, 0.5) == int(0.5 * 32 * 48 / 80)
    full = svd_factorize(lin, 32)
    torch.testing.assert_close(full(x), lin(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["hf", "effref"])
def test_full_rank_model_compression_is_function_preserving(impl):
    hf = load_model("tiny-llama", seed=3).model
    model = Llama.from_hf(hf) if impl == "effref" else hf
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
        before = before if isinstance(before, torch.Tensor) else before.logits
        full = {n: min(m.weight.shape) for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
        ranks = svd_compress_model(model, 0.5, rank_of=full, progress=False)
        after = model(ids)
        after = after if isinstance(after, torch.Tensor) else after.logits
    assert len(ranks) == 14 and all(isinstance(m, LowRankLinear) for n, m in model.named_modules() if n in ranks)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank, message", [(0, "rank=0"), (17, r"rank=17 must be .* \[1, 16\]"), (2.5, "rank=2.5"),
                                           (True, "rank=True")])
def test_bad_ranks_are_clear_errors(rank, message):
    with pytest.raises(ValueError, match=message):
        truncated_svd(torch.randn(16, 20), rank)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match=r"ratio=0 must be in \(0, 1\]"):
        rank_for_ratio(4, 4, 0)
    with pytest.raises(ValueError, match="expected \\(20, 20\\)"):
        truncated_svd(torch.randn(16, 20), 3, hessian=torch.eye(16))
    with pytest.raises(ValueError, match="calib_batches"):
        svd_compress_model(load_model("tiny-llama").model, 0.5, whiten=True, progress=False)
    with pytest.raises(ValueError, match="rank=9"):
        LowRankLinear(8, 4, 9)
    assert InputStats().hessian is None
