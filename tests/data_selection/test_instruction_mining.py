"""Instruction Mining: the linear quality rule against numpy's least squares, and selection by it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from effref.data_selection import QualityRule, fit_quality_rule, select_by_quality

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fit_recovers_a_known_rule_and_agrees_with_numpy_lstsq():
    generator = torch.Generator().manual_seed(0)
    indicators = torch.randn(40, 3, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1]) + 2
    losses = 1.5 + indicators @ torch.tensor([0.4, -0.05, 2.0], dtype=torch.float64)
    losses += 0.01 * torch.randn(40, generator=generator, dtype=torch.float64)
    rule = fit_quality_rule(indicators, losses)
    design = np.hstack([np.ones((40, 1)), indicators.numpy()])
    beta, *_ = np.linalg.lstsq(design, losses.numpy(), rcond=None)
    torch.testing.assert_close(rule.predicted_loss(indicators), torch.from_numpy(design @ beta))
    raw_coefficients = rule.coefficients / rule.scale  # back from standardized to raw indicators
    torch.testing.assert_close(raw_coefficients, torch.tensor([0.4, -0.05, 2.0], dtype=torch.float64), atol=0.02,
                               rtol=0)


def test_ridge_shrinks_the_coefficients():
    generator = torch.Generator().manual_seed(1)
    indicators = torch.randn(30, 2, generator=generator, dtype=torch.float64)
    losses = indicators @ torch.tensor([1.0, -1.0], dtype=torch.float64)
    plain, shrunk = fit_quality_rule(indicators, losses), fit_quality_rule(indicators, losses, ridge=30.0)
    assert shrunk.coefficients.norm() < 0.8 * plain.coefficients.norm()


def test_selection_keeps_the_lowest_predicted_loss_first():
    rule = QualityRule(intercept=1.0, coefficients=torch.tensor([1.0, -2.0], dtype=torch.float64),
                       mean=torch.zeros(2, dtype=torch.float64), scale=torch.ones(2, dtype=torch.float64))
    indicators = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
    assert select_by_quality(rule, indicators, 2).tolist() == [3, 1]  # predicted losses 1, -1, 2, -3


@pytest.mark.parametrize("call, message", [
    (lambda: fit_quality_rule(torch.zeros(5, 2), torch.zeros(4)), r"indicators must be \(M, F\) and losses"),
    (lambda: fit_quality_rule(torch.randn(3, 4), torch.zeros(3)), r"3 sets cannot determine 4 coefficients"),
    (lambda: fit_quality_rule(torch.randn(9, 2), torch.zeros(9), ridge=-1), r"ridge=-1 must be ≥ 0"),
    (lambda: select_by_quality(fit_quality_rule(torch.randn(9, 2), torch.zeros(9)), torch.zeros(0, 2), 1),
     r"pool of examples is empty"),
    (lambda: select_by_quality(fit_quality_rule(torch.randn(9, 2), torch.zeros(9)), torch.zeros(3, 2), 4),
     r"k=4 is larger than the pool of 3"),
    (lambda: fit_quality_rule(torch.randn(9, 2), torch.zeros(9)).predicted_loss(torch.zeros(3, 5)),
     r"indicators must be \(N, 2\)"),
])
def test_bad_inputs_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
