"""Masks and magnitude pruning: exact counts, exact N:M groups, the k smallest magnitudes, bad arguments."""

import pytest
import torch

from effref.models import load_model
from effref.models.llama import Llama
from effref.pruning.magnitude import magnitude_prune, magnitude_prune_model
from effref.pruning.masks import PruneConfig, nm_mask, prune_mask, sparsity_report, split_count


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.33, 0.5, 0.77, 0.95])
@pytest.mark.parametrize("group", ["layer", "row"])
def test_masks_prune_exactly_round_s_times_numel(sparsity, group):
    scores = torch.rand(13, 37, generator=torch.Generator().manual_seed(3))
    mask = prune_mask(scores, PruneConfig(sparsity), group)
    assert int(mask.sum()) == round(sparsity * scores.numel())
    if group == "row":  # rows differ by at most one, and each row prunes its own lowest scores
        per_row = mask.sum(1)
        assert int(per_row.max() - per_row.min()) <= 1
        for row, m in zip(scores, mask):
            if m.any() and (~m).any():
                assert row[m].max() <= row[~m].min()
    elif mask.any() and (~mask).any():
        assert scores[mask].max() <= scores[~mask].min()


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_masks_prune_exactly_m_minus_n_of_every_group_the_lowest(n, m):
    scores = torch.rand(6, 8 * m, generator=torch.Generator().manual_seed(n))
    mask = nm_mask(scores, n, m)
    groups, gmask = scores.reshape(6, 8, m), mask.reshape(6, 8, m)
    assert torch.all(gmask.sum(-1) == m - n)
    for g, gm in zip(groups.reshape(-1, m), gmask.reshape(-1, m)):  # brute force: the M − N smallest
        assert set(torch.nonzero(gm).flatten().tolist()) == set(g.argsort()[:m - n].tolist())


def test_split_count_sums_exactly():
    for k, sizes in [(7, [3, 3, 3]), (100, [128, 128, 64]), (0, [5, 5]), (10, [10])]:
        counts = split_count(k, sizes)
        assert sum(counts) == k and all(0 <= c <= s for c, s in zip(counts, sizes))


def test_magnitude_prunes_the_smallest_magnitudes_of_the_layer():
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(0))
    pruned, mask = magnitude_prune(w, None, PruneConfig(0.6))
    assert torch.equal(pruned == 0, mask) and int(mask.sum()) == round(0.6 * w.numel())
    assert w.abs()[mask].max() <= w.abs()[~mask].min()
    assert torch.equal(pruned[~mask], w[~mask])  # no update of survivors


@pytest.mark.parametrize("impl", ["hf", "effref"])
@pytest.mark.parametrize("cfg", [PruneConfig(0.3), PruneConfig(nm="2:4")])
def test_model_level_sparsity_is_exact_per_layer_and_globally(impl, cfg):
    model = load_model("tiny-llama", seed=2).model
    model = Llama.from_hf(model) if impl == "effref" else model
    embed_before = model.get_input_embeddings().weight.clone() if impl == "hf" else model.embed.weight.clone()
    masks = magnitude_prune_model(model, cfg, progress=False)
    per_layer, overall = sparsity_report(model)
    assert set(per_layer) == set(masks) and len(masks) == 14
    for name, s in per_layer.items():
        assert s == round(cfg.sparsity * masks[name].numel()) / masks[name].numel()
    total = sum(m.numel() for m in masks.values())
    assert overall * total == pytest.approx(sum(round(cfg.sparsity * m.numel()) for m in masks.values()))
    embed_after = model.get_input_embeddings().weight if impl == "hf" else model.embed.weight
    assert torch.equal(embed_before, embed_after)  # embeddings (tied to the head) are not pruned


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsity": 1.0}, r"sparsity=1.0 must be in \[0, 1\)"),
    ({"sparsity": -0.1}, r"must be in \[0, 1\)"),
    ({"sparsity": True}, r"must be in \[0, 1\)"),
    ({"nm": "4:2"}, "N must be <= M"),
    ({"nm": (5, 4)}, "N must be <= M"),
    ({"nm": "2-4"}, "not an N:M pattern"),
    ({"nm": (0, 4)}, "positive integers"),
    ({"sparsity": 0.9, "nm": "2:4"}, "sparsity=0.9 contradicts nm=2:4"),  # was silently 50%
])
def test_config_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig(**kwargs)


def test_config_sparsity_follows_the_pattern():
    assert PruneConfig().sparsity == 0.5 and PruneConfig(0.7).sparsity == 0.7
    assert PruneConfig(nm="2:4").sparsity == 0.5 and PruneConfig(nm=(1, 4)).sparsity == 0.75
    assert PruneConfig(0.5, nm="2:4").nm == (2, 4)  # the same sparsity said twice is fine


def test_incompatible_shapes_and_groups_are_rejected():
    with pytest.raises(ValueError, match="in_features divisible by M=8"):
        prune_mask(torch.rand(4, 12), PruneConfig(nm="4:8"))
    with pytest.raises(ValueError, match="must be 2-D"):
        magnitude_prune(torch.rand(4, 4, 4), None, PruneConfig(0.5))
    with pytest.raises(ValueError, match="group='column' is not known"):
        prune_mask(torch.rand(4, 8), PruneConfig(0.5), group="column")
