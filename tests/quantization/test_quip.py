"""QuIP: rotations are orthogonal and function-preserving (checked with explicit Kronecker products)."""

import pytest
import torch

from effref.quantization import QuantConfig
from effref.quantization.driver import LayerInputs
from effref.quantization.gptq import GPTQConfig, gptq_quantize
from effref.quantization.quip import (
    QuIPConfig,
    incoherence_process,
    quip_layer,
    quip_quantize,
    random_rotation,
    rotate,
)
from effref.quantization.rotations import _paley12, hadamard_factors


def _dense(rot):
    """R = (F₀ ⊗ F₁ ⊗ …)·diag(signs) as an explicit matrix, with torch.kron."""
    factors, signs = rot
    m = factors[0]
    for f in factors[1:]:
        m = torch.kron(m, f)
    return m * signs.float()


def test_paley_matrix_is_hadamard():
    h = _paley12()
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, 12 * torch.eye(12))


@pytest.mark.parametrize("n, kind", [(576, "orthogonal"), (576, "hadamard"), (1536, "hadamard"), (192, "orthogonal"),
                                     (7, "orthogonal"), (64, "hadamard")])
def test_rotations_are_orthogonal_and_rotate_matches_the_dense_product(n, kind):
    rot = random_rotation(n, kind, torch.Generator().manual_seed(n))
    r = _dense(rot)
    torch.testing.assert_close(r @ r.T, torch.eye(n), atol=1e-5, rtol=0)
    x = torch.randn(3, n)
    torch.testing.assert_close(rotate(x, rot), x @ r.T, atol=1e-4, rtol=1e-4)


def test_incoherence_processing_is_function_preserving_and_keeps_the_layer_loss():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 96, generator=g), torch.randn(200, 96, generator=g)
    h = x.T @ x / 200
    rot_out, rot_in = random_rotation(48, "orthogonal", g), random_rotation(96, "hadamard", g)
    u, v = _dense(rot_out), _dense(rot_in)
    w_t, h_t = incoherence_process(w, h, rot_out, rot_in)
    torch.testing.assert_close(w_t, u @ w @ v.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h_t, v @ h @ v.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x @ (u.T @ w_t @ v).T, x @ w.T, atol=1e-4, rtol=1e-4)  # y = Uᵀ W̃ V x
    d_t = torch.randn(48, 96, generator=g)  # any error made in the rotated space costs the same
    d = u.T @ d_t @ v
    torch.testing.assert_close(((d_t @ h_t) * d_t).sum(), ((d @ h) * d).sum(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("rotation", ["orthogonal", "hadamard"])
def test_the_layer_computes_with_u_transpose_q_v(rotation):
    g = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(128, 64, generator=g)
    cfg = QuIPConfig(GPTQConfig(QuantConfig(3, "channel")), rotation=rotation)
    layer = quip_layer(linear, LayerInputs(hessian=x.T @ x / 128), cfg)
    out = quip_quantize(linear.weight, x.T @ x / 128, cfg)
    rot_in = out["rot_in"] if rotation == "orthogonal" else (hadamard_factors(64), out["rot_in"][1])
    rot_out = out["rot_out"] if rotation == "orthogonal" else (hadamard_factors(32), out["rot_out"][1])
    expected = _dense(rot_out).T @ out["qtensor"].dequantize() @ _dense(rot_in)
    torch.testing.assert_close(layer.dequantize_weight(), expected, atol=1e-5, rtol=1e-5)
    if rotation == "hadamard":
        assert not any("rot_in_f" in name for name, _ in layer.named_buffers())  # only signs are stored


@pytest.mark.parametrize("bits", [2, 3])
def test_quip_beats_gptq_on_weights_with_outliers(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(96, 192, generator=g) * 0.02
    w[torch.rand(96, 192, generator=g) < 0.005] *= 20
    x = torch.randn(1024, 192, generator=g) * torch.exp(torch.randn(192, generator=g))
    h = x.T @ x / 1024
    qcfg = GPTQConfig(QuantConfig(bits, "channel"))
    gptq = gptq_quantize(w, h, qcfg)["qtensor"].dequantize()
    out = quip_quantize(w, h, QuIPConfig(qcfg))
    w_quip = _dense(out["rot_out"]).T @ out["qtensor"].dequantize() @ _dense(out["rot_in"])
    err = lambda w_hat: ((w - w_hat) @ x.T).norm()
    assert err(w_quip) < 0.6 * err(gptq)


@pytest.mark.parametrize("call, message", [
    (lambda: QuIPConfig(rotation="givens"), "rotation='givens' is not known"),
    (lambda: hadamard_factors(40), "no Hadamard rotation of order 40"),
    (lambda: random_rotation(8, "random"), "kind='random' is not known"),
    (lambda: quip_layer(torch.nn.Linear(4, 4), None), "QuIP needs the Hessian"),
])
def test_bad_arguments_fail_with_clear_messages(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_the_model_level_call_checks_every_rotation_before_changing_anything(monkeypatch):
    import copy

    import effref.quantization.quip as quip
    from effref.models import load_model

    model = load_model("tiny-llama").model
    calib = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    state = copy.deepcopy(model.state_dict())
    # a layer that would forget to undo V (computing with Uᵀ W̃ instead of Uᵀ W̃ V): caught before any change
    undo = quip.unrotate_weight
    monkeypatch.setattr(quip, "unrotate_weight", lambda w, rot_in, rot_out: undo(w, None, rot_out))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: QuIP's rotations changed the layer"):
        quip.quip_model(model, calib, QuIPConfig(GPTQConfig(QuantConfig(2, group_size=32))), progress=False)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(type(m).__name__ == "QuantLinear" for m in model.modules())
