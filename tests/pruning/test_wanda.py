"""Wanda against its definition computed from raw activations, and against magnitude on outlier features."""

import pytest
import torch

from effref.compression.calibration import InputStats
from effref.models import load_model
from effref.pruning.magnitude import magnitude_prune
from effref.pruning.masks import PruneConfig, sparsity_report
from effref.pruning.wanda import wanda_prune, wanda_prune_model


def _problem(seed, n=512, cin=64, cout=24):
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(cin)
    scale[torch.randperm(cin, generator=g)[:4]] = 20.0  # a few outlier features, as in LLM activations
    X = torch.randn(n, cin, generator=g) * scale
    W = torch.randn(cout, cin, generator=g)
    stats = InputStats()
    stats.update(X, ("sq_mean",), 0, g)
    return X, W, stats


@pytest.mark.parametrize("cfg", [PruneConfig(0.5), PruneConfig(0.25), PruneConfig(nm="2:4")])
def test_wanda_prunes_the_lowest_weight_times_feature_norm_of_each_row(cfg):
    X, W, stats = _problem(0)
    pruned, mask = wanda_prune(W, stats, cfg)
    score = W.abs() * torch.linalg.vector_norm(X, dim=0)  # Eq. 1 from the raw activations
    for r in range(W.shape[0]):
        groups = [slice(0, W.shape[1])] if cfg.nm is None else [slice(c, c + 4) for c in range(0, W.shape[1], 4)]
        for g in groups:
            m, s = mask[r, g], score[r, g]
            k = int(m.sum())
            assert set(torch.nonzero(m).flatten().tolist()) == set(s.argsort()[:k].tolist())
    assert torch.equal(pruned[~mask], W[~mask]) and torch.all(pruned[mask] == 0)
    assert int(mask.sum()) == round(cfg.sparsity * W.numel())


@pytest.mark.parametrize("seed", range(3))
def test_wanda_reconstructs_outputs_better_than_magnitude_with_outlier_features(seed):
    X, W, stats = _problem(seed)
    err = {name: ((W - fn(W, stats, PruneConfig(0.5))[0]) @ X.T).pow(2).sum()
           for name, fn in (("wanda", wanda_prune), ("magnitude", magnitude_prune))}
    assert err["wanda"] < err["magnitude"]


def test_wanda_model_sparsity_is_exact():
    model = load_model("tiny-llama", seed=3).model
    batches = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    masks = wanda_prune_model(model, batches, PruneConfig(0.4), progress=False)
    per_layer, _ = sparsity_report(model)
    assert all(per_layer[n] == round(0.4 * m.numel()) / m.numel() for n, m in masks.items())


def test_wanda_rejects_missing_or_mismatched_statistics():
    W = torch.randn(4, 8)
    with pytest.raises(ValueError, match="needs input statistics with sq_mean"):
        wanda_prune(W, InputStats(), PruneConfig(0.5))
    with pytest.raises(ValueError, match="in_features=8"):
        wanda_prune(W, InputStats(sq_mean=torch.ones(6)), PruneConfig(0.5))
    with pytest.raises(ValueError, match="calib_batches"):
        wanda_prune_model(load_model("tiny-llama").model, cfg=PruneConfig(0.5), progress=False)
