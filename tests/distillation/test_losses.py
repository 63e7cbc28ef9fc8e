"""Distillation divergences against their definitions written as explicit sums, scipy, and hand-derived gradients."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from effref.distillation.losses import check_vocab, forward_kl, generalized_jsd, reverse_kl, sequence_nll


def softmax_loop(row, T):
    """softmax(row / T) with Python floats, one entry at a time."""
    peak = max(row)
    exps = [math.exp((z - peak) / T) for z in row]
    total = sum(exps)
    return [e / total for e in exps]


def kl_loop(a, b):
    return sum(ai * (math.log(ai) - math.log(bi)) for ai, bi in zip(a, b))


def reference(kind, zs, zt, mask, T, beta=0.5):
    """T² · divergence per position, weighted mean over positions, by loops over B, T and V."""
    num = den = 0.0
    for i in range(zs.shape[0]):
        for j in range(zs.shape[1]):
            q = softmax_loop(zs[i, j].tolist(), T)
            p = softmax_loop(zt[i, j].tolist(), T)
            if kind == "forward":
                d = kl_loop(p, q)
            elif kind == "reverse":
                d = kl_loop(q, p)
            else:
                m = [beta * pv + (1 - beta) * qv for pv, qv in zip(p, q)]
                d = (beta * kl_loop(p, m) if beta > 0 else 0.0) + ((1 - beta) * kl_loop(q, m) if beta < 1 else 0.0)
            w = 1.0 if mask is None else float(mask[i, j])
            num += w * d
            den += w
    return T * T * num / den


OURS = {"forward": forward_kl, "reverse": reverse_kl, "gjsd": generalized_jsd}


def tiny(seed, B=2, T=3, V=5, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    zt = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    mask[0, 0] = 1.0
    return zs, zt, mask


@pytest.mark.parametrize("kind", ["forward", "reverse", "gjsd"])
@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("use_mask", [False, True])
def test_divergence_matches_its_definition_summed_by_hand(kind, T, use_mask):
    zs, zt, mask = tiny(int(T * 10) + use_mask)
    mask = mask if use_mask else None
    extra = {"beta": 0.3} if kind == "gjsd" else {}
    ours = OURS[kind](zs, zt, mask, temperature=T, **extra).item()
    assert ours == pytest.approx(reference(kind, zs, zt, mask, T, **extra), rel=1e-5, abs=1e-7)


def test_kl_and_jsd_agree_with_scipy():
    zs, zt, _ = tiny(3, B=1, T=1, V=7)
    p, q = zt[0, 0].softmax(-1).numpy(), zs[0, 0].softmax(-1).numpy()
    assert forward_kl(zs, zt).item() == pytest.approx(entropy(p, q), rel=1e-5)
    assert reverse_kl(zs, zt).item() == pytest.approx(entropy(q, p), rel=1e-5)
    assert generalized_jsd(zs, zt, beta=0.5).item() == pytest.approx(jensenshannon(p, q) ** 2, rel=1e-5)


def numeric_grad(kind, zs, zt, mask, T, beta, h=1e-5):
    grad = torch.zeros_like(zs)
    for idx in np.ndindex(*zs.shape):
        plus, minus = zs.clone(), zs.clone()
        plus[idx] += h
        minus[idx] -= h
        grad[idx] = (reference(kind, plus, zt, mask, T, beta) - reference(kind, minus, zt, mask, T, beta)) / (2 * h)
    return grad


@pytest.mark.parametrize("kind, beta", [("forward", 0.5), ("reverse", 0.5), ("gjsd", 0.2), ("gjsd", 0.9)])
def test_gradient_matches_central_differences_of_the_definition(kind, beta):
    zs, zt, _ = tiny(7, B=1, T=3, V=4)
    mask = torch.tensor([[1.0, 0.0, 0.5]], dtype=torch.float64)
    zs.requires_grad_(True)
    extra = {"beta": beta} if kind == "gjsd" else {}
    OURS[kind](zs, zt, mask, temperature=1.5, **extra).backward()
    expected = numeric_grad(kind, zs.detach(), zt, mask, 1.5, beta)
    torch.testing.assert_close(zs.grad, expected, rtol=1e-3, atol=1e-5)
    assert (mask == 0).any() and zs.grad[mask == 0].abs().max() == 0  # masked positions get no gradient


def test_hand_derived_gradients_of_forward_and_reverse_kl():
    zs, zt, _ = tiny(11, B=1, T=1, V=6)
    T = 2.0
    q, p = (zs / T).softmax(-1), (zt / T).softmax(-1)
    zs1 = zs.clone().requires_grad_(True)
    forward_kl(zs1, zt, temperature=T).backward()
    torch.testing.assert_close(zs1.grad, T * (q - p), rtol=1e-4, atol=1e-6)  # T²·(q − p)/T
    zs2 = zs.clone().requires_grad_(True)
    reverse_kl(zs2, zt, temperature=T).backward()
    log_ratio = q.log() - p.log()
    kl = (q * log_ratio).sum(-1, keepdim=True)
    torch.testing.assert_close(zs2.grad, T * q * (log_ratio - kl), rtol=1e-4, atol=1e-6)


def test_t_squared_keeps_the_gradient_at_hintons_high_temperature_limit():
    """Hinton §2.1: for zero-mean logits and large T, ∂(T² KL)/∂z_s → (z_s − z_t) / V (no 1/T² shrinkage)."""
    zs, zt, _ = tiny(5, B=1, T=2, V=8, scale=1.0)
    zs, zt = zs - zs.mean(-1, keepdim=True), zt - zt.mean(-1, keepdim=True)
    for T in (200.0, 400.0):
        z = zs.clone().requires_grad_(True)
        forward_kl(z, zt, temperature=T).backward()
        limit = (zs - zt) / 8 / 2  # mean over the 2 positions
        torch.testing.assert_close(z.grad, limit, rtol=2e-2, atol=1e-4)


def test_gjsd_limits_follow_gkd_convention():
    """GKD: GJSD(β) is 0 at β ∈ {0, 1}; GJSD/β → KL(p‖q) (forward) as β → 0, GJSD/(1−β) → KL(q‖p) as β → 1."""
    zs, zt, mask = tiny(13)
    assert generalized_jsd(zs, zt, mask, beta=0.0).item() == 0.0
    assert generalized_jsd(zs, zt, mask, beta=1.0).item() == 0.0
    eps = 1e-4
    fwd, rev = forward_kl(zs, zt, mask).item(), reverse_kl(zs, zt, mask).item()
    assert generalized_jsd(zs, zt, mask, beta=eps).item() / eps == pytest.approx(fwd, rel=2e-3)
    assert generalized_jsd(zs, zt, mask, beta=1 - eps).item() / eps == pytest.approx(rev, rel=2e-3)
    assert fwd != pytest.approx(rev, rel=0.05)  # the two limits are really different here
    z1, z2 = zs.clone().requires_grad_(True), zs.clone().requires_grad_(True)
    (generalized_jsd(z1, zt, mask, beta=eps) / eps).backward()
    forward_kl(z2, zt, mask).backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=5e-3, atol=1e-4)


def test_numerically_stable_for_huge_logits():
    zs, zt, _ = tiny(17)
    for fn in (forward_kl, reverse_kl, generalized_jsd):
        out = fn((zs * 1e4).float(), (zt * 1e4).float())
        assert torch.isfinite(out)


def test_sequence_nll_matches_log_softmax_lookup():
    zs, _, mask = tiny(19)
    targets = torch.tensor([[0, 4, 2], [1, 1, 3]])
    manual = -(zs.log_softmax(-1).gather(-1, targets[..., None])[..., 0] * mask).sum() / mask.sum()
    assert sequence_nll(zs, targets, mask).item() == pytest.approx(manual.item(), rel=1e-6)


BAD = [
    (lambda z: forward_kl(z, torch.randn(2, 3, 7)), "student vocabulary size 5 != teacher vocabulary size 7"),
    (lambda z: forward_kl(z, torch.randn(2, 3, 7)), "vocab_size=7"),
    (lambda z: forward_kl(z, torch.randn(2, 3, 5), temperature=0), "temperature=0 must be a finite number > 0"),
    (lambda z: reverse_kl(z, torch.randn(2, 3, 5), temperature=-1.0), "temperature=-1.0"),
    (lambda z: generalized_jsd(z, torch.randn(2, 3, 5), temperature=float("nan")), "temperature=nan"),
    (lambda z: generalized_jsd(z, torch.randn(2, 3, 5), beta=-0.1), "beta=-0.1 must lie in [0, 1]"),
    (lambda z: generalized_jsd(z, torch.randn(2, 3, 5), beta=1.5), "beta=1.5 must lie in [0, 1]"),
    (lambda z: forward_kl(z, torch.randn(2, 4, 5)), "teacher_logits shape (2, 4, 5) != student_logits shape"),
    (lambda z: forward_kl(z, torch.randn(2, 3, 5), mask=torch.ones(3, 2)), "mask shape (3, 2) != (B, T)"),
    (lambda z: forward_kl(z[0], torch.randn(3, 5)), "student_logits must have shape (B, T, V)"),
    (lambda z: sequence_nll(z, torch.zeros(2, 4, dtype=torch.long)), "must be (B, T, V) and (B, T)"),
    (lambda z: check_vocab(256, 49152), "student vocabulary size 256 != teacher vocabulary size 49152"),
]


@pytest.mark.parametrize("call, message", BAD)
def test_bad_inputs_raise_with_a_clear_message(call, message):
    with pytest.raises(ValueError) as info:
        call(torch.randn(2, 3, 5))
    assert message in str(info.value)
