"""ZeRO stages 0-3, FSDP-style prefetch and ZeRO-Offload on 3 real gloo ranks (uneven shards, padded).

Each engine must reproduce the single-process AdamW run on the whole batch, and the bytes each rank holds,
read from its live tensors, must equal the ZeRO paper's per-stage formula (fp32: 4Ψ + 4Ψ + 8Ψ, padded per unit).
"""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effref.distributed import (
    DataParallel,
    FSDPEngine,
    ZeroEngine,
    ZeroOffload,
    model_state_bytes,
    run_ranks,
    split_batch,
)
from effref.distributed.train import TinyLM, TrainConfig, batches, compare_engines, train
from effref.pretraining import AdamW, AdamWConfig

WORLD = 3
CFG = TrainConfig(engine="single", steps=3, batch=6)
ENGINES = ("effref-dp", "effref-zero0", "effref-zero1", "effref-zero2", "effref-zero3", "effref-fsdp",
           "effref-offload")
TARGET = f"{__file__}:%s"


def unit_numels(cfg):
    """Ψ_u per sharding unit, counted from a fresh model (each block, then whatever the model keeps itself)."""
    model = TinyLM(cfg)
    blocks = [sum(p.numel() for p in block.parameters()) for block in model.blocks]
    return [*blocks, sum(p.numel() for p in model.parameters()) - sum(blocks)]


def train_step(engine, cfg, window):
    rank = torch.distributed.get_rank()
    window = split_batch(window, rank, WORLD)  # (B / N, T + 1)
    F.cross_entropy(engine(window[:, :-1]).reshape(-1, 256), window[:, 1:].reshape(-1)).backward()
    engine.step()


def every_engine(cfg):
    results = compare_engines(cfg, list(ENGINES))
    results["effref-zero3 + checkpointing"] = train(replace(cfg, engine="effref-zero3", checkpoint_activations=True))
    optimizer = lambda shards: AdamW(shards, AdamWConfig(lr=cfg.lr))
    for prefetch in (False, True):
        torch.manual_seed(0)
        model = TinyLM(cfg)
        engine = FSDPEngine(model, optimizer, units=list(model.blocks), prefetch=prefetch)
        counts = []  # units whole while each block runs (this hook runs after the engine's gather)
        for block in model.blocks:
            block.register_forward_pre_hook(lambda m, args, counts=counts, units=engine.units:
                                            counts.append(sum(u.gathered() for u in units)))
        for window in list(batches(cfg))[:2]:  # the second step knows the forward order
            counts.clear()
            train_step(engine, cfg, window)
            engine.zero_grad()
        results[f"gathered, prefetch={prefetch}"] = list(counts)
        results[f"prefetches, prefetch={prefetch}"] = engine.prefetches
        with torch.no_grad():
            engine(torch.zeros(1, 4, dtype=torch.long))
        results[f"freed after forward, prefetch={prefetch}"] = not any(u.gathered() for u in engine.units)
    model = TinyLM(cfg)
    offload = ZeroOffload(model, optimizer, stage=2, units=list(model.blocks))
    train_step(offload, cfg, next(iter(batches(cfg))))
    results["offload placement"] = offload.placement_bytes()  # after the step, before zero_grad
    results["offload is a copy"] = all(u.shard.untyped_storage().data_ptr() != u.flat.untyped_storage().data_ptr()
                                       for u in offload.units)
    return results


@pytest.fixture(scope="module")
def runs():
    return run_ranks(TARGET % "every_engine", WORLD, CFG, timeout_s=240)


@pytest.fixture(scope="module")
def single():
    return train(CFG)


def test_the_units_do_not_split_evenly_so_padding_is_exercised():
    assert any(n % WORLD for n in unit_numels(CFG))


@pytest.fixture(scope="module")
def initial():
    torch.manual_seed(CFG.seed)
    return {name: p.detach().clone() for name, p in TinyLM(CFG).named_parameters()}


def test_the_reference_moves_far_beyond_the_tolerance(single, initial):
    moved = max((value - initial[name]).abs().max().item() for name, value in single["parameters"].items())
    assert moved > 20 * 2e-4  # so the comparisons below would see a missing or wrong step


@pytest.mark.parametrize("engine", [*ENGINES, "effref-zero3 + checkpointing"])
def test_every_engine_reproduces_single_process_adamw(runs, single, engine):
    for rank in range(WORLD):
        ours = runs[rank][engine]
        torch.testing.assert_close(ours["losses"], single["losses"], rtol=0, atol=1e-5)
        for name, value in single["parameters"].items():
            torch.testing.assert_close(ours["parameters"][name], value, rtol=0, atol=2e-4)


@pytest.mark.parametrize("engine, stage", [("effref-zero0", 0), ("effref-zero1", 1), ("effref-zero2", 2),
                                           ("effref-zero3", 3), ("effref-fsdp", 3)])
def test_measured_bytes_per_rank_equal_the_zero_formula(runs, engine, stage):
    expected = model_state_bytes(unit_numels(CFG), WORLD, stage)
    psi = sum(unit_numels(CFG))
    for rank in range(WORLD):
        assert runs[rank][engine]["bytes"] == expected
    # the formula itself: stage 0 holds 16 bytes per parameter, stage 3 a third of that (plus padding)
    assert model_state_bytes([psi], 1, 0) == {"parameters": 4 * psi, "gradients": 4 * psi,
                                              "optimizer_states": 8 * psi}
    assert sum(expected.values()) == {0: 16 * 3, 1: 8 * 3 + 8, 2: 4 * 3 + 12, 3: 16}[stage] * sum(
        -(-n // WORLD) for n in unit_numels(CFG))


def test_offload_keeps_the_optimizer_shard_and_its_gradient_on_the_host(runs):
    padded_shard = sum(-(-n // WORLD) for n in unit_numels(CFG))
    for rank in range(WORLD):
        assert runs[rank]["offload is a copy"]
        # model side: the whole fp32 parameters; host side: master shard, gradient shard, m and v (4 + 4 + 8)
        assert runs[rank]["offload placement"] == {"accelerator": 4 * padded_shard * WORLD,
                                                   "host": (4 + 4 + 8) * padded_shard}
        assert runs[rank]["effref-offload"]["bytes"]["optimizer_states"] == 8 * padded_shard


def test_stage_three_holds_one_block_at_a_time_and_prefetch_one_more(runs):
    n_layers = CFG.n_layers
    for rank in range(WORLD):
        # while block i runs: the model's own unit and block i, plus block i + 1 when prefetching
        assert runs[rank]["gathered, prefetch=False"] == [2] * n_layers
        assert runs[rank]["gathered, prefetch=True"] == [3] * (n_layers - 1) + [2]
        assert runs[rank]["prefetches, prefetch=False"] == 0
        # step 1: the forward order is not known yet, so only backward prefetches (n of them: the blocks);
        # step 2: n in forward (the model's unit fetches block 0 ahead, block i fetches block i + 1) and n back
        assert runs[rank]["prefetches, prefetch=True"] == 3 * n_layers
        assert runs[rank]["freed after forward, prefetch=True"] and runs[rank]["freed after forward, prefetch=False"]


def tiny():
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def adamw(shards):
    return torch.optim.AdamW(shards)


@pytest.mark.parametrize("make, error, message", [
    (lambda m: ZeroEngine(m, 4, adamw), ValueError, "stage=4 is not a ZeRO stage"),
    (lambda m: ZeroEngine(m, True, adamw), ValueError, "stage=True"),
    (lambda m: ZeroEngine(m, "1", adamw), ValueError, "stage='1'"),
    (lambda m: ZeroEngine(m, 1, "adamw"), TypeError, "optimizer='adamw' must build"),
    (lambda m: ZeroEngine(m, 3, adamw, units=[nn.Linear(2, 2)]), ValueError, "units must be distinct submodules"),
    (lambda m: ZeroEngine(m, 3, adamw, units=[m]), ValueError, "not the model itself"),
    (lambda m: ZeroEngine(m, 3, adamw, units=[m[0], m[0]]), ValueError, "distinct"),
    (lambda m: ZeroEngine(m, 0, adamw, optimizer_device="cpu"), ValueError, "optimizer_device needs"),
    (lambda m: ZeroOffload(m, adamw, stage=0), ValueError, "use stage 1, 2 or 3"),
    (lambda m: FSDPEngine(m, adamw, units=[]), ValueError, "units is empty"),
    (lambda m: ZeroEngine(m, 2, adamw), RuntimeError, "needs a process group"),
    (lambda m: DataParallel(m), RuntimeError, "needs a process group"),
    (lambda m: DataParallel(m, bucket_numel=0), ValueError, "bucket_numel=0"),
])
def test_bad_configuration_is_refused_before_the_model_changes(make, error, message):
    model = tiny()
    pointers = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(error, match=message):
        make(model)
    assert [p.data_ptr() for p in model.parameters()] == pointers  # no parameter was moved into a flat buffer


def test_mixed_dtypes_are_refused():
    with pytest.raises(ValueError, match="one dtype"):
        ZeroEngine(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).double()), 2, adamw)


@pytest.mark.parametrize("call, message", [
    (lambda: model_state_bytes([10], 2, 5), "stage=5"),
    (lambda: model_state_bytes([10], 0, 1), "world_size=0"),
    (lambda: split_batch(torch.zeros(7, 3), 0, 2), "batch of 7 rows does not split over world_size=2"),
    (lambda: TrainConfig(engine="horovod"), "engine='horovod' is not known"),
    (lambda: TrainConfig(d_model=30, n_heads=4), "not a multiple of n_heads"),
    (lambda: TrainConfig(steps=0), "steps=0"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_split_batch_hands_each_rank_its_own_rows():
    batch = torch.arange(12).view(6, 2)
    assert torch.equal(torch.cat([split_batch(batch, r, 3) for r in range(3)]), batch)
