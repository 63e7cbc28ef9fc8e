"""Initialisation schemes: each one's published rule, checked on the built model — DeepNorm's constants and
block, Fixup's zeros and scaling, the identity blocks of SkipInit and ReZero — and refusals of bad input."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from effref.pretraining.growth import TinyTransformer, TinyTransformerConfig
from effref.pretraining.init_schemes import (
    SCHEMES,
    deepnorm,
    deepnorm_constants,
    fixup,
    post_ln,
    rezero,
    skipinit,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = TinyTransformerConfig(vocab_size=30, d_model=64, n_layers=8, n_heads=4, d_head=16, d_ff=128, max_seq_len=16)
IDS = torch.randint(0, 30, (2, 10), generator=torch.Generator().manual_seed(0))


def embedded(model: TinyTransformer) -> torch.Tensor:
    return model.tok(IDS) + model.pos.weight[:IDS.shape[1]]  # (B, T, d_model)


@pytest.mark.parametrize("n_layers, alpha, beta", [(8, 2.0, 64 ** -0.25), (2, 4 ** 0.25, 16 ** -0.25),
                                                   (200, 20 ** 0.5, 40 ** -0.5)])
def test_deepnorm_constants_follow_the_decoder_only_formulas(n_layers, alpha, beta):
    assert deepnorm_constants(n_layers) == pytest.approx((alpha, beta), rel=1e-12)


def test_deepnorm_block_is_layernorm_of_alpha_skip_plus_branch():
    torch.manual_seed(0)
    model = deepnorm(CFG)
    alpha, _ = deepnorm_constants(8)
    block, x = model.blocks[0], torch.randn(2, 10, 64)
    h = F.layer_norm(alpha * x + block.attn(x), (64,), block.ln1.weight, block.ln1.bias)
    expected = F.layer_norm(alpha * h + block.mlp(h), (64,), block.ln2.weight, block.ln2.bias)
    torch.testing.assert_close(block(x), expected)


def test_deepnorm_scales_the_value_output_and_mlp_weights_by_beta():
    torch.manual_seed(0)
    model = deepnorm(replace(CFG, n_layers=32))
    _, beta = deepnorm_constants(32)
    xavier = math.sqrt(2 / (64 + 64))  # std of Xavier-normal for a 64 × 64 matrix
    q = torch.stack([b.attn.q.weight for b in model.blocks]).std().item()
    v = torch.stack([b.attn.v.weight for b in model.blocks]).std().item()
    up = torch.stack([b.mlp.up.weight for b in model.blocks]).std().item()
    # 131k draws each: the standard deviation is within 1% of its value with overwhelming probability
    assert q == pytest.approx(xavier, rel=0.01) and v == pytest.approx(beta * xavier, rel=0.01)
    assert up == pytest.approx(beta * math.sqrt(2 / (64 + 128)), rel=0.01)


def test_fixup_zeroes_branch_ends_and_head_and_scales_branch_inputs():
    torch.manual_seed(0)
    reference = TinyTransformer(replace(CFG, norm="none", residual_gain=True))  # same draws before Fixup's rules
    torch.manual_seed(0)
    model = fixup(CFG)
    scale = 16 ** -0.5  # (2L)^(-1/(2m-2)) with 2L = 16 branches, m = 2
    for ours, ref in zip(model.blocks, reference.blocks):
        torch.testing.assert_close(ours.mlp.up.weight, scale * ref.mlp.up.weight)
        torch.testing.assert_close(ours.attn.v.weight, scale * ref.attn.v.weight)
        assert ours.attn.o.weight.abs().max() == 0 and ours.mlp.down.weight.abs().max() == 0
        assert ours.attn_gain.item() == 1.0 and not hasattr(ours, "ln1")
    logits = model(IDS)
    assert logits.abs().max() == 0  # the zero head: uniform predictions, loss log V
    loss = F.cross_entropy(logits.reshape(-1, 30), IDS.reshape(-1))
    assert loss.item() == pytest.approx(math.log(30))


@pytest.mark.parametrize("build", [rezero, skipinit, fixup], ids=["rezero", "skipinit", "fixup"])
def test_the_zero_initialised_schemes_start_every_block_as_the_identity(build):
    torch.manual_seed(0)
    model = build(CFG)
    x = embedded(model)
    for block in model.blocks:
        torch.testing.assert_close(block(x), x, rtol=0, atol=0)


def test_a_nonzero_skipinit_alpha_is_not_the_identity():
    torch.manual_seed(0)
    model = skipinit(CFG, alpha=0.1)
    x = embedded(model)
    assert (model.blocks[0](x) - x).abs().max() > 1e-4
    assert model.blocks[3].mlp_gain.item() == pytest.approx(0.1)


def test_rezero_shares_one_alpha_per_block_and_skipinit_has_one_per_branch():
    torch.manual_seed(0)
    rz, si = rezero(CFG), skipinit(CFG)
    count = {name: sum(1 for n, _ in model.named_parameters() if n.endswith("_gain"))
             for name, model in (("rezero", rz), ("skipinit", si))}
    assert count == {"rezero": 8, "skipinit": 16}
    # the α receive gradient at zero: the loss reaches them through F(x), which is not zero
    F.cross_entropy(rz(IDS).reshape(-1, 30), IDS.reshape(-1)).backward()
    assert all(b.attn_gain.grad.abs() > 0 for b in rz.blocks)
    assert rz.blocks[0].attn_gain is rz.blocks[0].mlp_gain


def test_every_scheme_builds_the_size_asked_for():
    for name, build in SCHEMES.items():
        torch.manual_seed(0)
        model = build(CFG)
        assert model(IDS).shape == (2, 10, 30), name
        assert model.cfg.n_layers == 8 and model.cfg.d_model == 64
    assert post_ln(CFG).cfg.norm == "post" and deepnorm(CFG).cfg.skip_scale == pytest.approx(2.0)


@pytest.mark.parametrize("call, error, message", [
    (lambda: deepnorm_constants(0), ValueError, "n_layers=0"),
    (lambda: deepnorm_constants(2.5), ValueError, "n_layers=2.5"),
    (lambda: skipinit(CFG, alpha=-0.1), ValueError, "alpha=-0.1"),
    (lambda: skipinit(CFG, alpha="0"), ValueError, "alpha='0'"),
    (lambda: fixup({"n_layers": 8}), TypeError, "TinyTransformerConfig"),
    (lambda: deepnorm(None), TypeError, "TinyTransformerConfig"),
    (lambda: replace(CFG, n_layers=0), ValueError, "n_layers=0"),
    (lambda: replace(CFG, norm="sandwich"), ValueError, "norm='sandwich'"),
    (lambda: replace(CFG, skip_scale=0.0), ValueError, "skip_scale=0.0"),
])
def test_bad_arguments_are_refused_by_name(call, error, message):
    with pytest.raises(error, match=message):
        call()
