"""MeZO: the SPSA estimate is an unbiased gradient on a quadratic (statistical test), the step is θ − η·p·z."""

import pytest
import torch
from scipy.stats import chi2

from effref.peft.mezo import MezoConfig, mezo_step, mezo_train, spsa_projected_gradient

D = 5


class Quadratic(torch.nn.Module):
    """L(θ) = ½ θᵀAθ + bᵀθ with a fixed SPD A; ∇L = Aθ + b."""

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        m = torch.randn(D, D, generator=gen, dtype=torch.float64)
        self.register_buffer("A", m @ m.T / D + torch.eye(D, dtype=torch.float64))
        self.register_buffer("b", torch.randn(D, generator=gen, dtype=torch.float64))
        self.theta = torch.nn.Parameter(torch.randn(D, generator=gen, dtype=torch.float64))

    def forward(self):
        return 0.5 * self.theta @ self.A @ self.theta + self.b @ self.theta

    def grad(self):
        return self.A @ self.theta.detach() + self.b


def _direction(seed):
    """z as the module documents it: N(0, I) drawn from a generator seeded with the step's seed."""
    return torch.randn(D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_spsa_estimate_is_unbiased_on_a_quadratic():
    """Hotelling-style check of E[p·z] = ∇L with the exact covariance of p·z.

    For Gaussian z and a quadratic L the central difference is exact, p = zᵀg, so ĝ = (zᵀg)z has mean g and
    covariance Σ = ‖g‖²I + ggᵀ. With N independent seeds, T = N (m − g)ᵀ Σ⁻¹ (m − g) is approximately χ²(5);
    the test fails when T exceeds the 99.9% quantile, i.e. a correct estimator fails for about 1 in 1000 seed
    offsets (false-failure rate 1e-3; this offset is fixed, so the test is deterministic). Power: an estimator
    10% too large gives E[T] ≈ N·0.005 = 50 > 20.5, which the last assert checks.
    """
    model = Quadratic()
    g = model.grad()
    n = 10_000
    estimates = torch.stack([spsa_projected_gradient(model, model, eps=1e-2, seed=1000 + k)[0]
                             * _direction(1000 + k) for k in range(n)])  # (N, D)
    sigma = g.norm() ** 2 * torch.eye(D, dtype=torch.float64) + torch.outer(g, g)  # (D, D)

    def statistic(mean):
        diff = mean - g
        return float(n * diff @ torch.linalg.solve(sigma, diff))

    threshold = chi2.ppf(1 - 1e-3, df=D)
    assert statistic(estimates.mean(0)) < threshold
    assert statistic(1.1 * estimates.mean(0)) > threshold  # the test can tell a biased estimator apart


def test_spsa_restores_parameters_and_matches_directional_derivative():
    model = Quadratic()
    theta = model.theta.detach().clone()
    p, _ = spsa_projected_gradient(model, model, eps=1e-3, seed=7)
    torch.testing.assert_close(model.theta.detach(), theta, rtol=0, atol=1e-12)
    assert p == pytest.approx(float(_direction(7) @ model.grad()), rel=1e-9)


def test_mezo_step_moves_along_the_regenerated_direction():
    model = Quadratic()
    theta = model.theta.detach().clone()
    p = float(_direction(3) @ model.grad())  # exact for a quadratic
    mezo_step(model, model, MezoConfig(lr=0.01, eps=1e-3), seed=3)
    torch.testing.assert_close(model.theta.detach(), theta - 0.01 * p * _direction(3), rtol=1e-9, atol=1e-9)
    assert model.theta.grad is None  # forward passes only


def test_mezo_train_decreases_the_loss():
    model = Quadratic()
    with torch.no_grad():
        start = float(model())
    losses = mezo_train(model, lambda step: model(), steps=400, cfg=MezoConfig(lr=0.05, eps=1e-3),
                        progress=False)
    optimum = float(-0.5 * model.b @ torch.linalg.solve(model.A, model.b))
    assert len(losses) == 400
    with torch.no_grad():
        final = float(model())
    assert final - optimum < 0.05 * (start - optimum)


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": 0.0}, "lr=0.0 must be > 0"),
    ({"eps": -1.0}, "eps=-1.0 must be > 0"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1 must be >= 0"),
])
def test_mezo_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MezoConfig(**kwargs)


def test_mezo_rejects_frozen_model_and_zero_steps():
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        spsa_projected_gradient(frozen, lambda: frozen.weight.sum(), eps=1e-3, seed=0)
    with pytest.raises(ValueError, match="steps=0 must be >= 1"):
        mezo_train(Quadratic(), lambda step: torch.tensor(0.0), steps=0, cfg=MezoConfig())


def test_mezo_update_in_the_shared_loop_equals_mezo_steps_on_the_same_batches():
    # the shared fine-tuning loop with MeZO's update rule = calling mezo_step by hand on the loop's batches
    import copy

    from effref.finetune import task_loss, toy_task, train
    from effref.models import load_model
    from effref.peft.mezo import mezo_update

    task = toy_task(seed=0)
    model = load_model("tiny-llama", seed=0).model
    for name, p in model.named_parameters():
        p.requires_grad_("layers.1." in name)
    by_hand = copy.deepcopy(model)
    cfg = MezoConfig(lr=1e-3, eps=1e-3)
    result = train(model, task, steps=3, lr=1.0, batch_size=4, update=mezo_update(cfg, seed=7), progress=False)
    order = torch.randperm(len(task.train_ids), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(3):
        batch = order[step * 4:(step + 1) * 4]
        ids, labels = task.train_ids[batch], task.train_labels[batch]
        losses.append(mezo_step(by_hand, lambda ids=ids, labels=labels: task_loss(by_hand, task, ids, labels), cfg,
                                seed=7 + step))
    assert result.losses == pytest.approx(losses)
    for a, b in zip(model.parameters(), by_hand.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="regulariser= needs backpropagation"):
        train(model, task, steps=1, lr=1.0, update=mezo_update(cfg), regulariser=lambda m: 0.0, progress=False)
