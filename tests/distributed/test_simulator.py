"""The simulator reproduces the ZeRO paper's Figure 1, the bytes measured on real ranks, and the bubble."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effref.distributed.launch import run_ranks
from effref.distributed.pipeline import gpipe_schedule, one_f_one_b_schedule, simulate_schedule
from effref.distributed.simulator import (
    STRATEGIES,
    bubble_fraction,
    communication_elements,
    least_sharded_fit,
    memory_per_gpu,
    pipeline_bytes,
    tensor_parallel_bytes,
    transfer_seconds,
)


@pytest.mark.parametrize("strategy, gigabytes", [("DP", 120), ("ZeRO-1", 31.4), ("ZeRO-2", 16.6),
                                                 ("ZeRO-3", 1.9)])
def test_figure_1_of_the_zero_paper(strategy, gigabytes):
    """Ψ = 7.5 B, N_d = 64, K = 12: 120 GB, 31.4 GB, 16.6 GB and 1.9 GB per GPU (as printed, one decimal)."""
    got = memory_per_gpu(7.5e9, 64, strategy, k=12)["gpu_total"] / 1e9
    assert round(got, 1) == gigabytes


def test_the_formulas_term_by_term():
    psi, n, k = 1e9, 8, 12
    assert memory_per_gpu(psi, n, "DP") == {"weights": 2e9, "gradients": 2e9, "optimizer": 12e9,
                                               "gpu_total": 16e9, "cpu": 0.0}
    assert memory_per_gpu(psi, n, "ZeRO-2")["gpu_total"] == pytest.approx(2 * psi + (2 + k) * psi / n)
    offload = memory_per_gpu(psi, n, "ZeRO-Offload")
    assert offload["gpu_total"] == 2 * psi and offload["cpu"] == pytest.approx((2 + k) * psi / n)
    fp32 = memory_per_gpu(psi, n, "ZeRO-1", k=8, param_bytes=4)  # fp32 Adam: 4 + 4 + 8/N_d bytes per parameter
    assert fp32["gpu_total"] == pytest.approx(4 * psi + 4 * psi + 8 * psi / n)
    # tensor and pipeline parallelism divide every model state by t·p
    assert memory_per_gpu(psi, n, "ZeRO-1", tp=4, pp=2)["gpu_total"] == pytest.approx(
        memory_per_gpu(psi / 8, n, "ZeRO-1")["gpu_total"])


def zero_engine_worker():
    """Live per-rank bytes of effref's ZeroEngine at every stage, after one step of SGD with momentum."""
    from effref.distributed.zero import ZeroEngine

    measured = {}
    for stage, strategy in enumerate(STRATEGIES):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16))  # 544 and 528 parameters: no padding on 2
        engine = ZeroEngine(model, stage, lambda shards: torch.optim.SGD(shards, lr=0.1, momentum=0.9),
                            units=list(model))
        F.mse_loss(engine(torch.randn(4, 16)), torch.randn(4, 16)).backward()
        engine.step()
        measured[strategy] = engine.model_state_bytes()
    return measured


def test_the_formulas_equal_the_bytes_measured_on_real_ranks():
    """fp32 weights and gradients (4 bytes each) and one momentum buffer (K = 4), on 2 gloo ranks."""
    for measured in run_ranks(f"{__file__}:zero_engine_worker", 2, timeout_s=150):
        for strategy in STRATEGIES:
            predicted = memory_per_gpu(1072, 2, strategy, k=4, param_bytes=4)
            got = measured[strategy]
            assert (got["parameters"], got["gradients"], got["optimizer_states"]) == (
                predicted["weights"], predicted["gradients"], predicted["optimizer"])


def test_zero_3_moves_one_and_a_half_times_the_bytes_of_data_parallelism():
    psi = 7.5e9
    assert communication_elements(psi, "DP") == 2 * psi
    for strategy in ("ZeRO-1", "ZeRO-2"):
        assert communication_elements(psi, strategy) == communication_elements(psi, "DP")
    assert communication_elements(psi, "ZeRO-3") / communication_elements(psi, "DP") == 1.5
    assert communication_elements(psi, "ZeRO-3", gpus=64) == pytest.approx(3 * psi * 63 / 64)


def test_a_trillion_parameters_fit_on_1024_gpus_with_zero_3_only():
    """The ZeRO paper's headline: 1 T parameters, 1024 GPUs, ZeRO-3 → 16 TB / 1024 ≈ 15.6 GB per GPU."""
    assert memory_per_gpu(1e12, 1024, "ZeRO-3")["gpu_total"] == pytest.approx(15.625e9)
    assert least_sharded_fit(1e12, 1024, gpu_bytes=32e9) == "ZeRO-3"
    assert least_sharded_fit(7.5e9, 64, gpu_bytes=32e9) == "ZeRO-1"
    assert least_sharded_fit(7.5e9, 64, gpu_bytes=130e9) == "DP"
    assert least_sharded_fit(1e12, 8, gpu_bytes=80e9) is None


@pytest.mark.parametrize("stages, micro", [(2, 1), (4, 4), (4, 32), (8, 8), (16, 64)])
def test_the_bubble_formula_equals_the_simulated_schedules(stages, micro):
    for schedule in (gpipe_schedule, one_f_one_b_schedule):
        timeline = simulate_schedule(schedule(stages, micro))
        assert timeline.bubble == pytest.approx(bubble_fraction(stages, micro))


def test_communication_of_tensor_and_pipeline_parallelism():
    # 2 ranks all-reduce by sending 2(t−1)/t = 1 copy of the tensor: 4 all-reduces of 1024×8 fp32 values
    assert tensor_parallel_bytes(1, 1024, 8, 2, bytes_per_value=4) == 4 * 1024 * 8 * 4
    assert tensor_parallel_bytes(3, 1024, 8, 1) == 0  # one rank sends nothing
    assert pipeline_bytes(1024, 8, bytes_per_value=4) == 2 * 1024 * 8 * 4
    assert transfer_seconds(50e9, 25e9) == 2.0


@pytest.mark.parametrize("call, message", [
    (lambda: memory_per_gpu(1e9, 8, "ZeRO-4"), "strategy='ZeRO-4'"),
    (lambda: memory_per_gpu(0, 8), "params=0"),
    (lambda: memory_per_gpu(1e9, 0), "gpus=0"),
    (lambda: memory_per_gpu(1e9, 8, k=-1), "k=-1"),
    (lambda: memory_per_gpu(1e9, 8, tp=0), "tp=0"),
    (lambda: communication_elements(1e9, "FSDP"), "strategy='FSDP'"),
    (lambda: bubble_fraction(4, 0), "micro_batches=0"),
    (lambda: bubble_fraction(0, 4), "stages=0"),
    (lambda: transfer_seconds(1, 0), "bandwidth=0"),
    (lambda: least_sharded_fit(1e9, 8, gpu_bytes=0), "gpu_bytes=0"),
])
def test_bad_arguments_get_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
