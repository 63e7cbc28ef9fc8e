"""GPipe and 1F1B on real gloo ranks give the whole batch's gradients; simulated bubbles obey the formula."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from effref.distributed.launch import run_ranks
from effref.distributed.pipeline import (
    gpipe_schedule,
    one_f_one_b_schedule,
    pipeline_train_step,
    simulate_schedule,
    split_layers,
)

TARGET = f"{__file__}:%s"
LAYERS, D, BATCH, MICRO, STEPS = 7, 6, 8, 4, 3


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(LAYERS)])
    return model, torch.randn(BATCH, D), torch.randn(BATCH, D)


def pipeline_worker():
    """Both schedules, a few SGD steps each, on this rank's stage; then a micro-batch count that cannot work."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for schedule in ("gpipe", "1f1b"):
        model, x, y = make_model()
        stage = nn.Sequential(*[model[i] for i in split_layers(LAYERS, world)[rank]])
        opt = torch.optim.SGD(stage.parameters(), lr=0.1)
        losses, first_grads, orders = [], None, []
        for _ in range(STEPS):
            opt.zero_grad()
            result = pipeline_train_step(stage, x, y, F.mse_loss, MICRO, schedule=schedule)
            first_grads = first_grads or [p.grad.clone() for p in stage.parameters()]
            losses.append(result.loss)
            orders.append([(kind, i) for kind, i, *_ in result.events])
            opt.step()
        final = [p.detach() for p in stage.parameters()]
        out[schedule] = (losses, first_grads, final, orders[0], result.sent_bytes)
    out["errors"] = []
    for micro, targets in ((3, y), (MICRO, y[:4])):
        try:
            pipeline_train_step(stage, x, targets, F.mse_loss, micro)
        except ValueError as error:
            out["errors"].append(str(error))
    return out


def test_gpipe_and_1f1b_reproduce_one_process_on_the_whole_batch():
    world = 3
    results = run_ranks(TARGET % "pipeline_worker", world, timeout_s=150)
    model, x, y = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, first_grads = [], None
    for _ in range(STEPS):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        first_grads = first_grads or [p.grad.clone() for p in model.parameters()]
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < losses[0]
    params = list(model.parameters())
    ranges = split_layers(LAYERS, world)
    for schedule, build in (("gpipe", gpipe_schedule), ("1f1b", one_f_one_b_schedule)):
        assert results[-1][schedule][0] == pytest.approx(losses, rel=1e-5)
        for rank, result in enumerate(results):
            _, grads, final, order, sent = result[schedule]
            own = slice(2 * ranges[rank].start, 2 * ranges[rank].stop)  # weight and bias per layer
            for got, want in zip(grads, first_grads[own], strict=True):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
            for got, want in zip(final, params[own], strict=True):
                torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-5)
            assert order == build(world, MICRO)[rank]  # the processes ran the schedule as written
            # activations forward (all but the last stage) and gradients backward (all but the first)
            assert sent == ((rank < world - 1) + (rank > 0)) * BATCH * D * 4
    for result in results:  # refused on every rank before any message is sent
        assert "micro_batches=3 does not divide the batch of 8" in result["errors"][0]
        assert "inputs hold 8 samples but targets 4" in result["errors"][1]


@pytest.mark.parametrize("stages, micro", [(1, 1), (2, 1), (2, 5), (4, 4), (4, 16), (8, 3)])
@pytest.mark.parametrize("build", [gpipe_schedule, one_f_one_b_schedule])
def test_the_simulated_bubble_equals_the_formula(build, stages, micro):
    for forward, backward in ((1.0, 1.0), (1.0, 2.0), (0.3, 0.5)):
        timeline = simulate_schedule(build(stages, micro), forward, backward)
        assert timeline.bubble == pytest.approx((stages - 1) / (micro + stages - 1))
        assert timeline.makespan == pytest.approx((micro + stages - 1) * (forward + backward))


def test_1f1b_holds_fewer_activations_than_gpipe():
    stages, micro = 4, 8
    assert simulate_schedule(gpipe_schedule(stages, micro)).peak_in_flight == [micro] * stages
    assert simulate_schedule(one_f_one_b_schedule(stages, micro)).peak_in_flight == [4, 3, 2, 1]


def test_every_micro_batch_runs_forward_then_backward_once_per_stage():
    for build in (gpipe_schedule, one_f_one_b_schedule):
        for ops in build(3, 5):
            assert sorted(ops) == sorted([("F", i) for i in range(5)] + [("B", i) for i in range(5)])
            assert all(ops.index(("F", i)) < ops.index(("B", i)) for i in range(5))


def test_split_layers_is_contiguous_and_even():
    assert split_layers(7, 3) == [range(3), range(3, 5), range(5, 7)]
    assert split_layers(4, 4) == [range(i, i + 1) for i in range(4)]


@pytest.mark.parametrize("call, message", [
    (lambda: split_layers(3, 4), "stages=4 exceeds the model's 3 layers"),
    (lambda: gpipe_schedule(2, 0), "micro_batches=0 must be an int ≥ 1"),
    (lambda: one_f_one_b_schedule(0, 2), "stages=0"),
    (lambda: simulate_schedule(gpipe_schedule(2, 2), forward_time=0), "forward_time=0"),
    (lambda: simulate_schedule([[("B", 0), ("F", 0)]]), "deadlocks"),
])
def test_bad_configurations_get_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
