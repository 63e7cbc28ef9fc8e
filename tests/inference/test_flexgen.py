"""FlexGen cost model: a hand-computed tiny case, the LP against brute force, monotonicity, bad input."""

from __future__ import annotations

import itertools
from dataclasses import astuple, replace

import numpy as np
import pytest

from effref.inference.flexgen import (
    GB,
    T4_FLEXGEN,
    Hardware,
    ModelShape,
    Placement,
    Workload,
    cost_terms,
    evaluate,
    gpu_only,
    opt,
    search_policy,
    solve_placement,
)

TOY = ModelShape("toy", n_layers=2, d_model=4, n_heads=1, n_kv_heads=1, d_ff=8, mlp_mats=2)
TOY_HW = Hardware("toy", gpu_mem=2000, cpu_mem=5000, disk=1e6, ctog_bw=100, gtoc_bw=100, dtoc_bw=10, ctod_bw=5,
                  gpu_flops=1000, gpu_mem_bw=1000)


def test_cost_model_matches_a_hand_computed_tiny_case():
    # layer_params = 2·4·(4 + 4) + 2·4·8 = 128 → W = 256 bytes; kv(t) = 2·t·4·2 = 16t bytes; s = 2, n = 3.
    wl = Workload(prompt_len=2, gen_len=3)
    cost = evaluate(TOY, TOY_HW, wl, Placement(wg=0.5, wc=0.5, wd=0, cg=0, cc=1, cd=0))
    # prefill: ctog = 0.5·256/100 = 1.28; gtoc = kv(2)/100 = 0.32; compute = (2·128·2 + 4·2·1·4)/1000 = 0.544
    assert cost.pre_layer_s == pytest.approx(1.28)
    # decoding at mean context 3.5: ctog = (0.5·256 + kv(3.5) = 56)/100 = 1.84; compute = 0.312
    assert cost.gen_layer_s == pytest.approx(1.84)
    assert cost.bottleneck == "ctog"
    assert cost.total_s == pytest.approx(2 * (1.28 + 2 * 1.84))  # l · (T_pre + (n − 1) · T_gen)
    assert cost.throughput == pytest.approx(3 / cost.total_s)
    # GPU: half the weights 256 + block activations 16 + working set 512 + 112 + 8 + 160; CPU: 256 + cache 160
    assert cost.memory == pytest.approx({"gpu": 1064, "cpu": 416, "disk": 0})


def _grid_best(model, hw, wl, step):
    """Brute force: every placement on a grid, vectorised over the linear forms of cost_terms."""
    ticks = np.round(np.arange(0, 1 + 1e-9, step), 9)
    triples = np.array([(a, b, 1 - a - b) for a in ticks for b in ticks if a + b <= 1 + 1e-9])
    x = np.array([np.r_[w, c, h] for w, c, h in itertools.product(triples, repeat=3)])  # (N, 9)
    terms = cost_terms(model, hw, wl)
    val = {k: x @ c + const for k, (c, const) in terms.items()}
    ok = (val["mem_gpu"] <= hw.gpu_mem) & (val["mem_cpu"] <= hw.cpu_mem) & (val["mem_disk"] <= hw.disk)
    streams = ("ctog", "gtoc", "dtoc", "ctod", "comp")
    pre = np.max([val[f"pre_{s}"] for s in streams], axis=0)
    gen = np.max([val[f"gen_{s}"] for s in streams], axis=0)
    total = model.n_layers * (pre + (wl.gen_len - 1) * gen)
    return total[ok].min()


@pytest.mark.parametrize("gpu_mem", [900, 1100, 1500])  # all on the GPU would need 1656 bytes
def test_lp_obeys_memory_and_matches_brute_force_grid(gpu_mem):
    # a fast GPU and 1000 bytes of CPU memory: transfers dominate and both memory limits bind
    hw = replace(TOY_HW, gpu_mem=gpu_mem, cpu_mem=1000, gpu_flops=1e5, gpu_mem_bw=1e5)
    wl = Workload(prompt_len=2, gen_len=3, num_batches=2)
    best = solve_placement(TOY, hw, wl)
    assert best is not None
    assert best.memory["gpu"] <= gpu_mem * (1 + 1e-9) and best.memory["cpu"] <= hw.cpu_mem * (1 + 1e-9)
    assert best.bottleneck == "ctog"
    grid = _grid_best(TOY, hw, wl, step=0.1)
    assert best.total_s <= grid + 1e-9  # no grid point beats the LP optimum
    assert grid <= best.total_s * 1.05  # and a 0.1 grid gets within 5% of it
    x = np.array(astuple(best.placement)).reshape(3, 3)
    np.testing.assert_allclose(x.sum(1), 1)


def test_lp_keeps_everything_on_gpu_when_it_fits():
    wl = Workload(prompt_len=2, gen_len=3)
    hw = replace(TOY_HW, gpu_mem=1e9)
    assert solve_placement(TOY, hw, wl).total_s == pytest.approx(gpu_only(TOY, hw, wl).total_s)


def test_bigger_blocks_raise_throughput_and_latency_for_a_fixed_offloaded_placement():
    offloaded = Placement(wg=0, wc=1, wd=0, cg=0, cc=1, cd=0)
    costs = [evaluate(opt("30b"), replace(T4_FLEXGEN, cpu_mem=2000 * GB), Workload(512, 32, 4, k), offloaded)
             for k in (1, 2, 4, 8)]
    assert all(a.throughput < b.throughput for a, b in itertools.pairwise(costs))
    assert all(a.total_s < b.total_s for a, b in itertools.pairwise(costs))


def test_more_gpu_memory_or_bandwidth_never_hurts():
    model = opt("30b")
    base = search_policy(model, T4_FLEXGEN, 512, 32, gpu_batches=(8, 32), num_batches=(1, 4))[0]
    for better in (replace(T4_FLEXGEN, gpu_mem=24 * GB), replace(T4_FLEXGEN, ctog_bw=24 * GB)):
        assert search_policy(model, better, 512, 32, gpu_batches=(8, 32), num_batches=(1, 4))[0].throughput \
            >= base.throughput * (1 - 1e-9)


def test_offloading_runs_opt_175b_and_compression_helps():
    model = opt("175b")
    assert gpu_only(model, T4_FLEXGEN, Workload(512, 32)) is None  # 350 GB of fp16 weights on a 16 GB GPU
    grid = {"gpu_batches": (8, 32), "num_batches": (4, 8)}
    plain = search_policy(model, T4_FLEXGEN, 512, 32, **grid)
    packed = search_policy(model, T4_FLEXGEN, 512, 32, compress=True, **grid)
    assert plain and packed[0].throughput > plain[0].throughput
    assert plain[0].placement.wd > 0  # 350 GB do not fit in 208 GB of DRAM: part of the weights on disk


def test_latency_cap_is_respected():
    found = search_policy(opt("30b"), T4_FLEXGEN, 512, 32, gpu_batches=(1, 8, 32), num_batches=(1, 4),
                          max_latency_s=600)
    assert found and all(p.total_s <= 600 for p in found)


def test_llama_shape_counts_gqa_and_swiglu():
    from effref.models.llama import LlamaConfig
    shape = ModelShape.from_llama_config(LlamaConfig(d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                                     d_ff=1536))
    # q, o: 576² each; k, v: 576·192 each; gate, up, down: 576·1536 each (SmolLM2-135M's block)
    assert shape.layer_params == 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536


@pytest.mark.parametrize("make, message", [
    (lambda: Placement(wg=0.5, wc=0.4, wd=0.0), "weights fractions"),
    (lambda: Placement(cg=1.5, cc=-0.5), "cache fractions"),
    (lambda: Workload(prompt_len=0, gen_len=8), "prompt_len=0"),
    (lambda: Workload(prompt_len=8, gen_len=8, gpu_batch=-2), "gpu_batch=-2"),
    (lambda: replace(TOY_HW, gpu_mem=-1), "gpu_mem=-1"),
    (lambda: replace(TOY, d_ff=0), "d_ff=0"),
    (lambda: opt("13b"), "not one of"),
    (lambda: evaluate(opt("175b"), T4_FLEXGEN, Workload(512, 32), Placement()), "of gpu memory"),
    (lambda: search_policy(TOY, TOY_HW, 2, 3, max_latency_s=0), "max_latency_s=0"),
])
def test_bad_input_is_reported(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_infeasible_machine_returns_no_policy():
    tiny = replace(T4_FLEXGEN, gpu_mem=1 * GB, cpu_mem=1 * GB, disk=1 * GB)
    assert solve_placement(opt("30b"), tiny, Workload(512, 32)) is None
    assert search_policy(opt("30b"), tiny, 512, 32, gpu_batches=(1,), num_batches=(1,)) == []
