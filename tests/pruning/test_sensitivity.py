"""Hessian-sensitivity mixed sparsity: exact global count, bounds, and optimality against enumeration."""

import itertools

import pytest
import torch
from torch import nn

from effref.compression.calibration import InputStats, collect_input_stats
from effref.models import load_model
from effref.pruning.masks import PruneConfig, prune_linears, sparsity_report
from effref.pruning.sensitivity import hessian_sensitivity_sparsities
from effref.pruning.sparsegpt import sparsegpt_prune


class _Toy(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(i, o, bias=False)) for o, i in shapes)


def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = _Toy([(3, 4), (2, 4), (3, 3)])
    stats = {}
    for i, block in enumerate(model.blocks):
        lin = block[0]
        lin.weight.data = torch.randn(lin.weight.shape, generator=g) * (1 + 2 * i)
        X = torch.randn(40, lin.in_features, generator=g) @ torch.randn(lin.in_features, lin.in_features, generator=g)
        stats[f"blocks.{i}.0"] = InputStats(hessian=X.T @ X / 40)
    return model, stats


def _relative_saliency(weight, hessian, damp):
    H = hessian.double() + damp * torch.diagonal(hessian.double()).mean() * torch.eye(len(hessian))
    W = weight.double()
    eps = W.pow(2) / torch.diagonal(torch.linalg.inv(H))[None, :]  # OBS saliency
    return sorted((eps / torch.trace(W @ H @ W.T)).reshape(-1).tolist())


@pytest.mark.parametrize("sparsity, spread", [(0.5, 0.3), (0.4, 0.2), (0.6, 1.0)])
def test_allocation_minimises_summed_relative_saliency_with_the_exact_count(sparsity, spread):
    model, stats = _toy()
    alloc = hessian_sensitivity_sparsities(model, stats, sparsity, spread=spread, damp=0.01)
    sizes = {n: stats[n].hessian.shape[0] * (3 if n != "blocks.1.0" else 2) for n in stats}
    counts = {n: round(alloc[n] * sizes[n]) for n in alloc}
    total = round(sparsity * sum(sizes.values()))
    assert sum(counts.values()) == total
    sal = {n: _relative_saliency(model.get_submodule(n).weight, stats[n].hessian, 0.01) for n in stats}
    names = list(stats)
    ranges = [range(max(0, int((sparsity - spread) * sizes[n])), min(sizes[n] - 1, int((sparsity + spread) * sizes[n]))
                    + 1) for n in names]
    best = min(sum(sum(sal[n][:k]) for n, k in zip(names, ks))
               for ks in itertools.product(*ranges) if sum(ks) == total)
    ours = sum(sum(sal[n][:counts[n]]) for n in names)
    assert ours == pytest.approx(best, rel=1e-9)
    for n in names:
        assert sparsity - spread - 1e-9 <= alloc[n] <= sparsity + spread + 1e-9


def test_mixed_sparsity_with_sparsegpt_keeps_the_global_ratio_exactly():
    model = load_model("tiny-llama", seed=5).model
    batches = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = collect_input_stats(model, batches, progress=False)
    alloc = hessian_sensitivity_sparsities(model, stats, 0.6, spread=0.15)
    assert len({round(v, 3) for v in alloc.values()}) > 1  # really mixed
    masks = prune_linears(model, sparsegpt_prune, PruneConfig(0.6), needs=("hessian",), stats=stats,
                          sparsities=alloc, progress=False)
    _per_layer, overall = sparsity_report(model)
    total = sum(m.numel() for m in masks.values())
    assert round(overall * total) == round(0.6 * total)
    for name, mask in masks.items():
        assert int(mask.sum()) == round(alloc[name] * mask.numel())


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsity": 1.0}, r"must be in \[0, 1\)"), ({"sparsity": 0.5, "spread": 2.0}, "spread=2.0"),
    ({"sparsity": 0.5, "spread": 0.0, "stats": {}}, "lack a hessian")])
def test_allocation_rejects_bad_arguments(kwargs, message):
    model, stats = _toy()
    kwargs.setdefault("stats", stats)
    with pytest.raises(ValueError, match=message):
        hessian_sensitivity_sparsities(model, **kwargs)
