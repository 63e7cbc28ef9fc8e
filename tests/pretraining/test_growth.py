"""Model growth: FPI computes the small model's function (LayerNorm included), AKI takes the next layer's weights,
stacking copies blocks, identity growth preserves the function, LiGO at its FPI/stacking start reproduces both,
and growth to a smaller size is refused by name."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from effref.pretraining.adamw import AdamW, AdamWConfig
from effref.pretraining.growth import (
    LiGO,
    TinyTransformer,
    TinyTransformerConfig,
    aki_widen,
    fpi_widen,
    grow_depth,
    width_maps,
)
from effref.pretraining.training import PretrainConfig, pretrain

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = TinyTransformerConfig(vocab_size=40, d_model=16, n_layers=3, n_heads=2, d_head=8, d_ff=32, max_seq_len=16)
IDS = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(1))


def trained_like(cfg: TinyTransformerConfig = SMALL) -> TinyTransformer:
    """A model with large random weights everywhere (LayerNorm gains and biases too), as after training."""
    torch.manual_seed(0)
    model = TinyTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("norm", ["post", "pre", "none"])
@pytest.mark.parametrize("width", [(32, 3, 48), (48, 6, 64), (16, 2, 32)])
def test_fpi_computes_the_small_models_function(norm, width):
    small = trained_like(replace(SMALL, norm=norm, residual_gain=norm == "none"))
    grown = fpi_widen(small, *width, seed=3)
    assert (grown.cfg.d_model, grown.cfg.n_heads, grown.cfg.d_ff) == width
    assert grown.num_parameters() >= small.num_parameters()
    torch.testing.assert_close(grown(IDS), small(IDS), atol=2e-5, rtol=1e-5)


def test_fpi_keeps_every_hidden_vector_as_copies_of_the_small_ones():
    # the mechanism, not only the output: after block 0, the wide hidden state is the small one indexed by g
    small = trained_like()
    grown = fpi_widen(small, 32, 4, 64, seed=5)
    g = width_maps(SMALL, 32, 4, 64, seed=5).hidden
    x_small = small.blocks[0](small.tok(IDS) + small.pos.weight[:12])  # (B, T, 16)
    x_grown = grown.blocks[0](grown.tok(IDS) + grown.pos.weight[:12])  # (B, T, 32)
    torch.testing.assert_close(x_grown, x_small[..., g], atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.bincount(g), torch.full((16,), 2))  # every unit twice: LayerNorm sees mean, var of x


def test_fpi_with_a_non_multiple_hidden_size_is_exact_only_without_layernorm():
    post, free = trained_like(), trained_like(replace(SMALL, norm="none"))
    post_gap = (fpi_widen(post, 24, 2, 32)(IDS) - post(IDS)).abs().max().item()
    free_gap = (fpi_widen(free, 24, 2, 32)(IDS) - free(IDS)).abs().max().item()
    assert post_gap > 1e-3 and free_gap < 1e-4  # unequal copies shift LayerNorm's mean and variance


def test_fpi_copies_stay_identical_under_training_which_aki_breaks():
    # FPI's known weakness: a unit and its copy get equal gradients forever; AKI's copies differ from the start
    stream = torch.arange(3000) % 7
    cfg = PretrainConfig(steps=5, batch_size=4, seq_len=12, warmup_steps=0)
    g = width_maps(SMALL, 32, 2, 64, seed=0).ff
    copies = [(i, j) for j in range(32, 64) for i in range(32) if g[j] == i]
    for widen, symmetric in ((fpi_widen, True), (aki_widen, False)):
        grown = widen(trained_like(), 32, 2, 64, seed=0)
        pretrain(grown, stream, AdamW(grown.parameters(), AdamWConfig(lr=1e-2, weight_decay=0.0)), cfg,
                 progress=False)
        up = grown.blocks[0].mlp.up.weight  # (64, 32)
        gaps = torch.stack([(up[i] - up[j]).abs().max() for i, j in copies])
        assert (gaps.max() < 1e-6) == symmetric


def test_aki_takes_the_new_units_from_the_next_block_and_the_old_ones_from_its_own():
    small = trained_like()
    aki, fpi = aki_widen(small, 32, 4, 64, seed=2), fpi_widen(small, 32, 4, 64, seed=2)
    maps = width_maps(SMALL, 32, 4, 64, seed=2)
    for layer, upper in ((0, 1), (1, 2), (2, 2)):
        up_aki, up_small_next = aki.blocks[layer].mlp.up, small.blocks[upper].mlp.up
        # old MLP units: this block's (FPI); new units: block l + 1's rows, mapped by g and inputs split
        torch.testing.assert_close(up_aki.weight[:32], fpi.blocks[layer].mlp.up.weight[:32])
        copies = torch.bincount(maps.hidden)[maps.hidden].float()  # (32,)
        expected = up_small_next.weight[maps.ff[32:]][:, maps.hidden] / copies
        torch.testing.assert_close(up_aki.weight[32:], expected)
        torch.testing.assert_close(up_aki.bias[32:], up_small_next.bias[maps.ff[32:]])
        o_aki = aki.blocks[layer].attn.o.weight  # (32, 64): new hidden rows from the upper block
        torch.testing.assert_close(o_aki[16:], fpi.blocks[upper].attn.o.weight[16:])
    for name in ("tok.weight", "pos.weight", "head.weight"):
        assert torch.equal(aki.state_dict()[name], fpi.state_dict()[name])
    assert (aki(IDS) - small(IDS)).abs().max() > 1e-2  # not function-preserving, by design


def test_stacking_copies_the_trained_blocks_on_top():
    small = trained_like()
    deep = grow_depth(small, 6)
    x = small.tok(IDS) + small.pos.weight[:12]
    for block in list(small.blocks) * 2:  # the reference: the small stack run twice
        x = block(x)
    torch.testing.assert_close(deep(IDS), small.head(x))
    assert torch.equal(deep.blocks[4].mlp.up.weight, small.blocks[1].mlp.up.weight)
    assert deep.blocks[4].mlp.up.weight.data_ptr() != small.blocks[1].mlp.up.weight.data_ptr()  # a copy


@pytest.mark.parametrize("norm", ["pre", "none"])
def test_identity_depth_growth_preserves_the_function(norm):
    small = trained_like(replace(SMALL, norm=norm))
    deep = grow_depth(small, 7, how="identity")
    torch.testing.assert_close(deep(IDS), small(IDS), atol=1e-5, rtol=1e-5)
    assert deep.cfg.n_layers == 7 and deep.blocks[1].mlp.up.weight.abs().sum() > 0  # copies, not empty blocks


def test_ligo_started_at_fpi_and_stacking_reproduces_both():
    small = trained_like()
    ligo = LiGO(small, 32, 4, 64, n_layers=6, seed=4)
    reference = grow_depth(fpi_widen(small, 32, 4, 64, seed=4), 6)
    grown = ligo.materialize()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(grown.state_dict()[name], tensor, msg=name)
    torch.testing.assert_close(ligo(IDS), reference(IDS))
    assert {n for n, _ in ligo.named_parameters()} >= {"expand.hidden_copy", "depth.attn_q_weight"}
    assert sum(p.numel() for p in ligo.parameters()) < reference.num_parameters()  # E and D only


def test_ligo_trains_its_operator_and_not_the_small_model():
    small = trained_like()
    before = {n: t.clone() for n, t in small.state_dict().items()}
    ligo = LiGO(small, 32, 4, 64, n_layers=4, noise_std=0.01)
    stream = torch.arange(3000) % 7
    start = [p.detach().clone() for p in ligo.parameters()]
    result = pretrain(ligo, stream, AdamW(ligo.parameters(), AdamWConfig(lr=1e-2)),
                      PretrainConfig(steps=15, batch_size=4, seq_len=12, warmup_steps=0), progress=False)
    assert result.losses[-1] < result.losses[0]
    assert all(not torch.equal(a, b) for a, b in zip(start, ligo.parameters()))
    assert all(torch.equal(before[n], t) for n, t in small.state_dict().items())
    grown = ligo.materialize()  # the learned operator's model, as ordinary weights
    window = stream[:13][None]
    loss = F.cross_entropy(grown(window[:, :-1])[0], window[0, 1:])
    torch.testing.assert_close(loss, F.cross_entropy(ligo(window[:, :-1])[0], window[0, 1:]))


@pytest.mark.parametrize("call, message", [
    (lambda m: fpi_widen(m, 8, 2, 32), "d_model=8 is smaller"),
    (lambda m: fpi_widen(m, 16, 1, 32), "n_heads=1 is smaller"),
    (lambda m: aki_widen(m, 16, 2, 16), "d_ff=16 is smaller"),
    (lambda m: grow_depth(m, 2), "fewer than the model's 3 blocks"),
    (lambda m: grow_depth(m, 0), "n_layers=0 must be positive"),
    (lambda m: grow_depth(m, -4), "must be positive"),
    (lambda m: grow_depth(m, 6, how="interleave"), "how='interleave'"),
    (lambda m: grow_depth(m, 6, how="identity"), "cannot preserve a post-LN"),
    (lambda m: LiGO(m, 32, 4, 64, n_layers=2), "n_layers=2"),
    (lambda m: LiGO(m, 32, 4, 64, n_layers=4, noise_std=-1.0), "noise_std=-1.0"),
    (lambda m: LiGO(m, 8, 4, 64, n_layers=4), "d_model=8 is smaller"),
])
def test_impossible_growth_is_refused_by_name(call, message):
    small = trained_like()
    before = {n: t.clone() for n, t in small.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        call(small)
    assert all(torch.equal(before[n], t) for n, t in small.state_dict().items())


@pytest.mark.parametrize("call", [lambda: fpi_widen(torch.nn.Linear(2, 2), 4, 2, 4),
                                  lambda: grow_depth(trained_like(), 4.0),
                                  lambda: fpi_widen(trained_like(), 32.0, 2, 32)])
def test_wrong_types_are_refused(call):
    with pytest.raises(TypeError):
        call()
