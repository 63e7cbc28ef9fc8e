"""AdamW, Lion and Sophia against torch.optim.AdamW, the papers' update rules written element by element, and the
properties each rule promises; the Hessian estimators against exact Hessians; state bytes from live tensors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from effref.models.llama import Llama, LlamaConfig
from effref.pretraining.adamw import AdamW, AdamWConfig
from effref.pretraining.lion import Lion, LionConfig
from effref.pretraining.mixed_precision import MixedPrecision, MixedPrecisionConfig
from effref.pretraining.sophia import Sophia, SophiaConfig, gnb_hessian, hutchinson_hessian
from effref.pretraining.state import optimizer_state_bytes, training_bytes
from effref.pretraining.training import state_bytes_after_step

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = LlamaConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=32,
                   tie_embeddings=True)


def tiny_llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(TINY)


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY.vocab_size, (2, 17), generator=gen) for _ in range(n)]


def loss_of(model, ids):
    return F.cross_entropy(model(ids[:, :-1]).reshape(-1, TINY.vocab_size), ids[:, 1:].reshape(-1))


def gradient_sequence(steps: int, shape=(5,), seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(steps)]


def run_optimizer(optimizer_cls, cfg, theta0, grads):
    p = torch.nn.Parameter(theta0.clone())
    opt = optimizer_cls([p], cfg)
    trajectory = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        trajectory.append(p.detach().clone())
    return trajectory


# ---------------------------------------------------------------- AdamW


@pytest.mark.parametrize("weight_decay, betas", [(0.0, (0.9, 0.999)), (0.1, (0.9, 0.95))])
def test_adamw_equals_torch_adamw_step_for_step(weight_decay, betas):
    ours_model, ref_model = tiny_llama(), tiny_llama()
    ours = AdamW(ours_model.parameters(), AdamWConfig(lr=3e-3, betas=betas, weight_decay=weight_decay))
    ref = torch.optim.AdamW(ref_model.parameters(), lr=3e-3, betas=betas, weight_decay=weight_decay, foreach=False)
    for ids in batches(10):
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            loss_of(model, ids).backward()
            opt.step()
        for a, b in zip(ours_model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any((a - b).abs().max() > 0 for a, b in zip(ours_model.parameters(), tiny_llama().parameters()))


def test_adamw_follows_the_published_rule_element_by_element():
    """Algorithm 2 of Loshchilov & Hutter with η_t = 1, written for one number at a time in float64."""
    lr, (b1, b2), eps, wd = 0.01, (0.9, 0.999), 1e-8, 0.1
    theta0, grads = torch.tensor([0.5, -1.0, 2.0, 0.0, 3e-3]), gradient_sequence(6)
    ours = run_optimizer(AdamW, AdamWConfig(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd), theta0, grads)
    for i in range(5):
        theta, m, v = float(theta0[i]), 0.0, 0.0
        for t, g in enumerate(grads, start=1):
            g = float(g[i])
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
            theta = theta - lr * (m_hat / (math.sqrt(v_hat) + eps) + wd * theta)
            assert math.isclose(float(ours[t - 1][i]), theta, rel_tol=1e-5, abs_tol=1e-7)


# ---------------------------------------------------------------- Lion


def test_lion_follows_algorithm_2_element_by_element():
    lr, (b1, b2), wd = 0.01, (0.9, 0.99), 0.5
    theta0, grads = torch.tensor([0.5, -1.0, 2.0, 0.0, 3e-3]), gradient_sequence(8, seed=3)
    ours = run_optimizer(Lion, LionConfig(lr=lr, betas=(b1, b2), weight_decay=wd), theta0, grads)
    for i in range(5):
        theta, m = float(theta0[i]), 0.0
        for t, g in enumerate(grads):
            g = float(g[i])
            c = b1 * m + (1 - b1) * g
            sign = (c > 0) - (c < 0)
            theta = theta - lr * (sign + wd * theta)
            m = b2 * m + (1 - b2) * g
            assert math.isclose(float(ours[t][i]), theta, rel_tol=1e-6, abs_tol=1e-7)


def test_lion_moves_every_coordinate_by_exactly_lr():
    """Without weight decay Lion's update is ±η on every coordinate, whatever the gradient's size."""
    gen = torch.Generator().manual_seed(0)
    theta0 = torch.zeros(1000)
    grads = [torch.randn(1000, generator=gen) * 10 ** torch.empty(1000).uniform_(-6, 3, generator=gen)
             for _ in range(5)]
    trajectory = run_optimizer(Lion, LionConfig(lr=1e-3), theta0, grads)
    previous = theta0
    for theta in trajectory:
        step = (theta - previous).abs()
        torch.testing.assert_close(step, torch.full_like(step, 1e-3), rtol=0, atol=1e-9)
        previous = theta


def test_lion_state_is_one_moment():
    model = tiny_llama()
    opt = Lion(model.parameters(), LionConfig(lr=1e-4))
    loss_of(model, batches(1)[0]).backward()
    opt.step()
    assert all(set(s) == {"exp_avg"} for s in opt.state.values())


# ---------------------------------------------------------------- Sophia


def test_sophia_follows_algorithm_3_element_by_element():
    """Gradient EMA, Hessian EMA every k steps from given estimates, decoupled decay, clipped ratio."""
    lr, (b1, b2), gamma, eps, wd, k = 0.01, (0.96, 0.99), 0.05, 1e-12, 0.1, 3
    theta0, grads = torch.tensor([0.5, -1.0, 2.0, 0.0, 3e-3]), gradient_sequence(9, seed=5)
    estimates = [g.abs() * 40 - 5 for g in gradient_sequence(9, seed=6)]  # some negative, as Hutchinson's can be
    p = torch.nn.Parameter(theta0.clone())
    opt = Sophia([p], SophiaConfig(lr=lr, betas=(b1, b2), gamma=gamma, eps=eps, weight_decay=wd, hessian_every=k))
    ours = []
    for t, g in enumerate(grads):
        if t % k == 0:
            opt.update_hessian([estimates[t]])
        p.grad = g.clone()
        opt.step()
        ours.append(p.detach().clone())
    for i in range(5):
        theta, m, h = float(theta0[i]), 0.0, 0.0
        for t, g in enumerate(grads):
            if t % k == 0:
                h = b2 * h + (1 - b2) * float(estimates[t][i])
            m = b1 * m + (1 - b1) * float(g[i])
            theta = theta - lr * wd * theta
            ratio = m / max(gamma * h, eps)
            theta = theta - lr * max(min(ratio, 1.0), -1.0)
            assert math.isclose(float(ours[t][i]), theta, rel_tol=1e-5, abs_tol=1e-7)
    assert opt.hessian_updates == 3


def test_sophia_steps_are_bounded_by_lr_and_newton_like_where_curvature_is_large():
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(2000))
    opt = Sophia([p], SophiaConfig(lr=1e-2, gamma=1.0, weight_decay=0.0, betas=(0.0, 0.0)))  # no EMA: m = g, h = ĥ
    g = torch.randn(2000, generator=gen) * 10 ** torch.empty(2000).uniform_(-4, 2, generator=gen)
    h = torch.randn(2000, generator=gen) * 10 ** torch.empty(2000).uniform_(-4, 4, generator=gen)
    opt.update_hessian([h])
    p.grad = g
    opt.step()
    step = -p.detach()
    assert step.abs().max() <= 1e-2 * (1 + 1e-6)  # never more than η per coordinate
    newton = (h > 0) & (g.abs() < h)  # inside the clip: the step is η·g/h, a scaled Newton step
    torch.testing.assert_close(step[newton], 1e-2 * g[newton] / h[newton])
    clipped = ~newton
    torch.testing.assert_close(step[clipped], 1e-2 * g[clipped].sign())  # negative or small h: ±η
    assert newton.sum() > 300 and clipped.sum() > 300


def test_sophia_before_any_hessian_estimate_is_sign_momentum():
    p = torch.nn.Parameter(torch.zeros(50))
    opt = Sophia([p], SophiaConfig(lr=1e-3, weight_decay=0.0))
    g = torch.randn(50, generator=torch.Generator().manual_seed(2))
    p.grad = g
    opt.step()
    torch.testing.assert_close(p.detach(), -1e-3 * g.sign())


def test_hutchinson_estimate_is_unbiased_for_the_hessian_diagonal():
    """The mean of 4,000 estimates on a small two-layer network is within 5 standard errors of the exact diagonal
    (computed with torch.autograd.functional.hessian); the false-failure rate of a 5σ bound is below 1e-6."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=gen), torch.randn(8, generator=gen)
    w1, w2 = torch.randn(4, 3, generator=gen), torch.randn(4, generator=gen)
    flat = torch.cat([w1.reshape(-1), w2]).requires_grad_()

    def loss_fn(theta):
        a, b = theta[:12].reshape(4, 3), theta[12:]
        return ((torch.tanh(x @ a.T) @ b - y) ** 2).mean()

    exact = torch.autograd.functional.hessian(loss_fn, flat).diagonal()
    samples = torch.stack([hutchinson_hessian(loss_fn(flat), [flat], gen)[0] for _ in range(4000)])
    mean, stderr = samples.mean(0), samples.std(0) / math.sqrt(4000)
    assert ((mean - exact).abs() <= 5 * stderr + 1e-6).all()
    assert exact.abs().max() > 0.1


def test_gnb_estimate_matches_the_gauss_newton_diagonal():
    """Softmax regression: the mean of 4,000 GNB estimates matches diag(Jᵀ(diag(p) − ppᵀ)J) averaged over the
    batch, computed example by example with autograd Jacobians (5 standard errors, false-failure rate < 1e-6)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=gen)
    w = (torch.randn(4, 3, generator=gen) * 0.7).requires_grad_()
    exact = torch.zeros(12)
    for xi in x:
        p = (w @ xi).softmax(-1).detach()
        jac = torch.autograd.functional.jacobian(lambda w_: w_ @ xi, w).reshape(4, 12)  # ∂logits/∂w
        exact += (jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac).diagonal() / len(x)
    samples = torch.stack([gnb_hessian(x @ w.T, [w], gen)[0].reshape(-1) for _ in range(4000)])
    mean, stderr = samples.mean(0), samples.std(0) / math.sqrt(4000)
    assert ((mean - exact).abs() <= 5 * stderr + 1e-6).all()


def test_sophia_refreshes_its_hessian_with_either_estimator():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
    x, y = torch.randn(32, 8), torch.randint(0, 5, (32,))
    for estimator in ("gnb", "hutchinson"):
        model = copy.deepcopy(mlp)
        opt = Sophia(model.parameters(), SophiaConfig(lr=1e-2, estimator=estimator, hessian_every=2))
        losses = []
        for step in range(30):
            if step % 2 == 0:
                opt.refresh_hessian(model(x), y, torch.Generator().manual_seed(step))
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert opt.hessian_updates == 15 and losses[-1] < 0.8 * losses[0]
        assert all((s["hessian"] != 0).any() for s in opt.state.values())
    with pytest.raises(ValueError, match="targets="):
        Sophia(mlp.parameters(), SophiaConfig(estimator="hutchinson")).refresh_hessian(mlp(x))


# ---------------------------------------------------------------- state bytes


def _torch_sgd_momentum(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


@pytest.mark.parametrize("make, per_param, keys", [
    (lambda ps: AdamW(ps), 8, {"exp_avg", "exp_avg_sq", "t"}),
    (lambda ps: Lion(ps), 4, {"exp_avg"}),
    (lambda ps: Sophia(ps), 8, {"exp_avg", "hessian"}),
    (_torch_sgd_momentum, 4, {"momentum_buffer"}),
])
def test_optimizer_state_bytes_are_measured_from_the_state_tensors(make, per_param, keys):
    model = tiny_llama()
    opt = make(model.parameters())
    assert optimizer_state_bytes(opt) == 0  # nothing before the first step
    loss_of(model, batches(1)[0]).backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    assert optimizer_state_bytes(opt) == per_param * n
    assert all(set(s) == keys for s in opt.state.values())


def test_torch_adamw_adds_only_its_step_counters():
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters())
    loss_of(model, batches(1)[0]).backward()
    opt.step()
    n, tensors = sum(p.numel() for p in model.parameters()), len(list(model.parameters()))
    assert optimizer_state_bytes(opt) == 8 * n + 4 * tensors  # m, v, and one float32 step per tensor


def test_mixed_precision_adamw_keeps_16_bytes_per_parameter_as_zero_counts():
    """fp16 weights (2) + fp16 gradients (2) + fp32 master (4) + m (4) + v (4) = 16, and fp32 AdamW also 16."""
    window = batches(1)[0]
    model = tiny_llama()
    mp = MixedPrecision(model, lambda ps: AdamW(ps), MixedPrecisionConfig(dtype=torch.float16))
    mixed = state_bytes_after_step(model, mp, window).per_parameter()
    assert mixed == {"weights": 2, "gradients": 2, "master": 4, "optimizer": 8, "total": 16}
    model = tiny_llama()
    fp32 = state_bytes_after_step(model, AdamW(model.parameters()), window).per_parameter()
    assert fp32 == {"weights": 4, "gradients": 4, "master": 0, "optimizer": 8, "total": 16}
    model = tiny_llama()
    lion = state_bytes_after_step(model, Lion(model.parameters()), window).per_parameter()
    assert lion["total"] == 12 and all(p.grad is None for p in model.parameters())


def test_training_bytes_counts_tied_weights_once():
    model = tiny_llama()
    opt = AdamW(model.parameters())
    loss_of(model, batches(1)[0]).backward()
    opt.step()
    measured = training_bytes(model, opt)
    assert measured.parameters == model.num_parameters() < sum(p.numel() for p in model.state_dict().values())


# ---------------------------------------------------------------- refused hyperparameters


@pytest.mark.parametrize("config, kwargs, message", [
    (AdamWConfig, dict(lr=0.0), "lr=0.0"),
    (AdamWConfig, dict(lr=float("nan")), "lr=nan"),
    (AdamWConfig, dict(betas=(1.0, 0.999)), r"betas\[0\]=1.0"),
    (AdamWConfig, dict(betas=(0.9, -0.1)), r"betas\[1\]=-0.1"),
    (AdamWConfig, dict(betas=(0.9,)), "must be a pair"),
    (AdamWConfig, dict(eps=0.0), "eps=0.0"),
    (AdamWConfig, dict(weight_decay=-0.1), "weight_decay=-0.1"),
    (LionConfig, dict(lr=-1e-4), "lr=-0.0001"),
    (LionConfig, dict(betas=(0.9, 1.5)), r"betas\[1\]=1.5"),
    (LionConfig, dict(weight_decay=-1.0), "weight_decay=-1.0"),
    (SophiaConfig, dict(lr=0), "lr=0"),
    (SophiaConfig, dict(gamma=0.0), "gamma=0.0"),
    (SophiaConfig, dict(eps=0.0), "eps=0.0"),
    (SophiaConfig, dict(betas=(0.96, 1.0)), r"betas\[1\]=1.0"),
    (SophiaConfig, dict(hessian_every=0), "hessian_every=0"),
    (SophiaConfig, dict(estimator="newton"), "estimator='newton'"),
    (SophiaConfig, dict(weight_decay=float("inf")), "weight_decay=inf"),
])
def test_bad_hyperparameters_are_refused_by_name(config, kwargs, message):
    with pytest.raises(ValueError, match=message):
        config(**kwargs)


@pytest.mark.parametrize("optimizer", [AdamW, Lion, Sophia])
def test_a_config_of_the_wrong_kind_is_refused(optimizer):
    with pytest.raises(TypeError, match=f"cfg must be a {optimizer.__name__}Config"):
        optimizer(tiny_llama().parameters(), LionConfig() if optimizer is not Lion else AdamWConfig())


def test_sophia_refuses_estimates_that_do_not_match_its_parameters():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Sophia([p])
    with pytest.raises(ValueError, match="2 Hessian estimates for 1 parameters"):
        opt.update_hessian([torch.ones(3), torch.ones(3)])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        opt.update_hessian([torch.ones(4)])
