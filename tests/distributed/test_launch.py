"""run_ranks starts real gloo processes: collectives see every rank, failures and bad arguments are reported."""

import pytest
import torch
import torch.distributed as dist

from effref.distributed import run_ranks

TARGET = f"{__file__}:%s"  # the workers below, named by this file's path


def rank_sum(offset):
    x = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(x)
    return dist.get_rank(), dist.get_world_size(), x.item()


def fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("planted failure")
    return "ok"


def test_every_rank_joins_one_group():
    results = run_ranks(TARGET % "rank_sum", 3, 10.0, timeout_s=120)
    assert results == [(r, 3, 0 + 1 + 2 + 3 * 10.0) for r in range(3)]


def test_a_failing_rank_is_reported_with_its_log():
    with pytest.raises(RuntimeError, match="rank 1 of 2 failed(.|\n)*planted failure"):
        run_ranks(TARGET % "fail_on_rank_one", 2, timeout_s=120)


@pytest.mark.parametrize("kwargs, message", [({"world_size": 0}, "world_size"),
                                             ({"world_size": 2, "timeout_s": 0}, "timeout_s")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_ranks(TARGET % "rank_sum", **kwargs)


def test_a_missing_target_fails_before_any_process_starts():
    with pytest.raises(ValueError, match="package.module:function"):
        run_ranks("no_colon", 2)
