"""BitNet's BitLinear against the paper's equations computed from scratch, its STE gradients, and training."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effref.models.llama import Llama, LlamaConfig
from effref.quantization.bitnet import (
    BitLinear,
    BitNetConfig,
    binarize_weight,
    bitnet_model,
    quantize_input,
    train_language_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # training a tiny model (tests/conftest.py)


def definition(x: torch.Tensor, w: torch.Tensor, bits: int = 8, per_token: bool = False) -> torch.Tensor:
    """Eq. 1–11 of the paper, written out in float64 with explicit integer arithmetic."""
    x, w = x.double(), w.double()
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    x = (x - mu) / torch.sqrt(var + 1e-5)  # LN without affine parameters
    q_b = 2 ** (bits - 1)
    gamma = x.abs().amax(-1, keepdim=True) if per_token else x.abs().max()
    x_int = torch.clamp(torch.round(x * q_b / gamma), -q_b + 1, q_b - 1).long()  # x̃
    w_bin = torch.where(w > w.mean(), 1, -1).long()  # W̃ = Sign(W − α)
    beta = w.abs().sum() / w.numel()  # β = ‖W‖₁ / (n m)
    y_int = x_int @ w_bin.T  # exact integer products
    return y_int.double() * beta * gamma / q_b  # y = W̃ x̃ · βγ / Q_b


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_forward_matches_the_paper_equations(per_token, bits):
    torch.manual_seed(0)
    lin = nn.Linear(48, 20, bias=False)
    layer = BitLinear.from_linear(lin, BitNetConfig(act_bits=bits, act_granularity="token" if per_token else "tensor"))
    x = torch.randn(3, 7, 48) * 4 + 1
    torch.testing.assert_close(layer(x).double(), definition(x, lin.weight.detach(), bits, per_token),
                               atol=1e-5, rtol=1e-5)


def test_codes_and_binary_weights_lie_on_their_grids():
    w = torch.randint(-5, 6, (16, 32)).float()
    w[:, 16:] = -w[:, :16]  # mean exactly 0
    w[0, 0] = w[0, 16] = 0.0  # exactly the mean: Sign(0) = −1 by the paper's convention
    signs, beta = binarize_weight(w)
    assert set(signs.unique().tolist()) == {-1.0, 1.0} and signs[0, 0] == -1
    assert beta == pytest.approx(w.abs().mean().item())
    codes, _ = quantize_input(torch.randn(5, 32) * 10, BitNetConfig())
    assert torch.equal(codes, codes.round()) and codes.abs().max() == 127  # the absmax element reaches ±127


def test_straight_through_gradients():
    torch.manual_seed(1)
    lin = nn.Linear(24, 10)
    layer = BitLinear.from_linear(lin, BitNetConfig(layer_norm=False))
    x = torch.randn(6, 24, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    codes, gamma = quantize_input(x.detach(), layer.cfg)
    signs, beta = binarize_weight(lin.weight.detach())
    torch.testing.assert_close(lin.weight.grad, g.T @ (codes * gamma / 128))  # ∂(βW̃)/∂W treated as I
    torch.testing.assert_close(x.grad, g @ (signs * beta))  # ∂x̃/∂x treated as I
    torch.testing.assert_close(lin.bias.grad, g.sum(0))


def _tiny(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64,
                             max_seq_len=64))


def test_model_level_swap_keeps_embeddings_and_head_in_float():
    model = bitnet_model(_tiny(), progress=False)
    swapped = [n for n, m in model.named_modules() if isinstance(m, BitLinear)]
    assert len(swapped) == 14 and not isinstance(model.lm_head, BitLinear)
    layer = model.blocks[0].mlp.down
    assert layer.inference_nbytes() == math.ceil(64 * 32 / 8) + 2


def test_bitnet_learns_from_scratch():
    # a periodic token stream: learnable by both models within a few dozen steps
    ids = torch.arange(4000) % 7 * 3 % 32
    fp, bit = _tiny(), bitnet_model(_tiny(), progress=False)
    assert torch.equal(fp.embed.weight, bit.embed.weight)  # same initial weights
    fp_losses = train_language_model(fp, ids, steps=30, batch_size=8, seq_len=32, lr=1e-2, progress=False)
    bit_losses = train_language_model(bit, ids, steps=30, batch_size=8, seq_len=32, lr=1e-2, progress=False)
    assert fp_losses[-1] < 0.5 * fp_losses[0]
    assert bit_losses[-1] < 0.5 * bit_losses[0]


def test_same_initial_forward_as_definition_inside_a_model():
    model = _tiny()
    reference = copy.deepcopy(model)
    bitnet_model(model, progress=False)
    ids = torch.randint(0, 32, (2, 10))
    x = reference.blocks[0].attn_norm(reference.embed(ids))  # the input of block 0's q_proj
    expected = definition(x, reference.blocks[0].attn.q_proj.weight.detach())
    got = model.blocks[0].attn.q_proj(x)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


BAD = [
    (lambda: BitNetConfig(act_bits=1), ValueError, r"act_bits=1 is not supported"),
    (lambda: BitNetConfig(act_bits=9), ValueError, r"act_bits=9 is not supported"),
    (lambda: BitNetConfig(act_granularity="channel"), ValueError, r"act_granularity='channel' is not known"),
    (lambda: BitLinear.from_linear(nn.Conv1d(2, 2, 1)), TypeError, r"linear must be an nn\.Linear"),
    (lambda: train_language_model(_tiny(), torch.arange(10), steps=1, seq_len=32), ValueError, r"seq_len=32"),
    (lambda: bitnet_model(nn.Sequential(nn.Linear(2, 2)), progress=False), ValueError, r"found no nn\.ModuleList"),
]


@pytest.mark.parametrize("make, error, message", BAD)
def test_bad_arguments_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_layer_norm_makes_the_layer_scale_invariant():
    torch.manual_seed(2)
    layer = BitLinear.from_linear(nn.Linear(16, 4, bias=False))
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(100 * x), layer(x), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(F.linear(100 * x, layer.weight), F.linear(x, layer.weight))
