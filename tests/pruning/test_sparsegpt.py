"""SparseGPT against brute-force least squares (OBS) on tiny problems and against magnitude / Wanda."""

import pytest
import torch

from effref.compression.calibration import InputStats
from effref.models import load_model
from effref.models.llama import Llama
from effref.pruning.magnitude import magnitude_prune
from effref.pruning.masks import PruneConfig, sparsity_report
from effref.pruning.sparsegpt import SparseGPTConfig, sparsegpt_prune, sparsegpt_prune_model
from effref.pruning.wanda import wanda_prune


def _correlated(seed, n=1024, cin=64, cout=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cin, cin, generator=g, dtype=dtype) / cin ** 0.5  # correlated features
    scale = torch.rand(cin, generator=g, dtype=dtype) * 3 + 0.2
    X = torch.randn(n, cin, generator=g, dtype=dtype) @ mix * scale
    W = torch.randn(cout, cin, generator=g, dtype=dtype)
    stats = InputStats()
    stats.update(X, ("hessian", "sq_mean"), 0, g)
    stats.hessian = stats.hessian.to(dtype)
    return X, W, stats


def _obs_brute_force(W, X, mask):
    """Each row: for every pruned column j in order, set w_j = 0 and re-fit the later columns by least squares
    (earlier columns stay fixed) — the OBS step of SparseGPT written as explicit regressions."""
    out = W.clone()
    for r in range(W.shape[0]):
        target = X @ W[r]  # the dense layer's outputs for this row, (n,)
        w = W[r].clone()
        for j in range(W.shape[1]):
            if mask[r, j]:
                fixed = w.clone()
                fixed[j:] = 0
                w[j] = 0
                if j + 1 < W.shape[1]:
                    w[j + 1:] = torch.linalg.lstsq(X[:, j + 1:], (target - X @ fixed)[:, None]).solution[:, 0]
        out[r] = w
    return out


@pytest.mark.parametrize("cfg", [SparseGPTConfig(0.5, damp=0.0, block_size=4), SparseGPTConfig(nm="2:4", damp=0.0)])
def test_sparsegpt_update_equals_sequential_least_squares(cfg):
    X, W, stats = _correlated(0, n=300, cin=12, cout=3)
    pruned, mask = sparsegpt_prune(W, stats, cfg)
    torch.testing.assert_close(pruned, _obs_brute_force(W, X, mask), rtol=1e-6, atol=1e-6)


def test_sparsegpt_is_the_exact_masked_least_squares_when_pruned_columns_come_first():
    X, W, stats = _correlated(1, n=300, cin=10, cout=1)
    W[0, :5] *= 1e-4  # the first five weights score lowest, so the mask prunes exactly them
    pruned, mask = sparsegpt_prune(W, stats, SparseGPTConfig(0.5, damp=0.0))
    assert torch.equal(mask[0], torch.arange(10) < 5)
    kept = ~mask[0]  # no kept column precedes a pruned one: the sequential updates reach the global optimum
    best = torch.linalg.lstsq(X[:, kept], (X @ W[0])[:, None]).solution[:, 0]
    torch.testing.assert_close(pruned[0, kept], best, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("cfg", [PruneConfig(0.5), PruneConfig(0.7), PruneConfig(nm="2:4"), PruneConfig(nm="4:8")])
@pytest.mark.parametrize("seed", range(3))
def test_sparsegpt_reconstruction_error_is_below_magnitude_and_wanda(cfg, seed):
    X, W, stats = _correlated(seed, dtype=torch.float32)
    err = {name: ((W - fn(W, stats, cfg)[0]) @ X.T).pow(2).sum().item()
           for name, fn in (("sparsegpt", sparsegpt_prune), ("wanda", wanda_prune), ("magnitude", magnitude_prune))}
    assert err["sparsegpt"] < err["wanda"] and err["sparsegpt"] < err["magnitude"], err


@pytest.mark.parametrize("nm", ["2:4", "4:8"])
def test_sparsegpt_nm_masks_are_exact_and_weights_zero_there(nm):
    _X, W, stats = _correlated(2, dtype=torch.float32)
    pruned, mask = sparsegpt_prune(W, stats, PruneConfig(nm=nm))
    n, m = map(int, nm.split(":"))
    assert torch.all(mask.reshape(W.shape[0], -1, m).sum(-1) == m - n)
    assert torch.all(pruned[mask] == 0)


@pytest.mark.parametrize("impl", ["hf", "effref"])
def test_sequential_model_pruning_is_exact_and_the_model_runs(impl):
    model = load_model("tiny-llama", seed=4).model
    model = Llama.from_hf(model) if impl == "effref" else model
    batches = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    masks = sparsegpt_prune_model(model, batches, PruneConfig(0.5), progress=False)
    per_layer, overall = sparsity_report(model)
    assert overall == 0.5 and all(per_layer[n] == 0.5 for n in masks)
    out = model(batches)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    assert torch.isfinite(logits).all()


def test_sparsegpt_rejects_bad_arguments():
    W = torch.randn(4, 8)
    with pytest.raises(ValueError, match="needs input statistics with a hessian"):
        sparsegpt_prune(W, InputStats(), PruneConfig(0.5))
    with pytest.raises(ValueError, match="in_features=8"):
        sparsegpt_prune(W, InputStats(hessian=torch.eye(6)), PruneConfig(0.5))
    with pytest.raises(ValueError, match="multiple of M=8"):
        SparseGPTConfig(nm="4:8", block_size=12)
    with pytest.raises(ValueError, match="block_size=0"):
        SparseGPTConfig(block_size=0)
    with pytest.raises(ValueError, match="divisible by M=8"):
        sparsegpt_prune(torch.randn(4, 12), InputStats(hessian=torch.eye(12)), PruneConfig(nm="4:8"))
