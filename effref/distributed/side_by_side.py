"""Our ZeRO stages beside PyTorch's and DeepSpeed's, as rows for the frameworks comparison.

One gloo job of ``world_size`` processes trains the same small model with each engine in turn
(``effref.distributed.train.compare_engines``: same seed, same batches, same AdamW), and each pair of runs becomes
a row: the largest difference between the two loss curves and the ratio of their seconds per step (ours / theirs).
Pairs: our ZeRO-1 and ``torch.distributed.optim.ZeroRedundancyOptimizer`` (optimizer states sharded), our ZeRO-3
and FSDP2's ``fully_shard`` (parameters sharded), our stages 1, 2 and 3 and DeepSpeed's. A library that is not
installed gives a row that says so instead of failing the rest.
"""

from __future__ import annotations

import importlib.util

PAIRS = (  # (our engine, the library's engine, the library, what is compared)
    ("effref-zero1", "zero-redundancy", "torch ZeroRedundancyOptimizer", "ZeRO-1"),
    ("effref-zero3", "fsdp2", "torch FSDP2 (fully_shard)", "ZeRO-3"),
    ("effref-zero1", "deepspeed-zero1", "DeepSpeed", "ZeRO-1"),
    ("effref-zero2", "deepspeed-zero2", "DeepSpeed", "ZeRO-2"),
    ("effref-zero3", "deepspeed-zero3", "DeepSpeed", "ZeRO-3"),
)


def _run_engines(cfg, engines: list[str]) -> dict[str, dict]:
    from effref.distributed.train import compare_engines

    results = compare_engines(cfg, engines)
    return {name: {"losses": r["losses"], "seconds_per_step": r["seconds_per_step"]} for name, r in results.items()}


def zero_side_by_side(world_size: int = 2, steps: int = 4, timeout_s: float = 600) -> list[dict]:
    """One row per pair of ``PAIRS``: ``comparison, library, ours, metric, agreement, time_ratio, status, reason``."""
    from effref.distributed.launch import run_ranks
    from effref.distributed.train import TrainConfig

    has_deepspeed = importlib.util.find_spec("deepspeed") is not None
    pairs = [p for p in PAIRS if has_deepspeed or not p[1].startswith("deepspeed")]
    engines = sorted({engine for pair in pairs for engine in pair[:2]})
    results = run_ranks("effref.distributed.side_by_side:_run_engines", world_size,
                        TrainConfig(steps=steps), engines, timeout_s=timeout_s)[0]
    rows = []
    for ours, theirs, library, stage in PAIRS:
        row = {"comparison": f"{stage} training, {world_size} processes", "library": library,
               "ours": f"effref.distributed.ZeroEngine ({ours})", "metric": "max |Δ loss|"}
        if (ours, theirs, library, stage) not in pairs:
            rows.append({**row, "agreement": None, "time_ratio": None, "status": "unavailable",
                         "reason": "deepspeed is not installed (pip install 'effref[frameworks]')"})
            continue
        mine, ref = results[ours], results[theirs]
        gap = max(abs(a - b) for a, b in zip(mine["losses"], ref["losses"]))
        rows.append({**row, "agreement": gap, "time_ratio": mine["seconds_per_step"] / ref["seconds_per_step"],
                     "status": "ok", "reason": ""})
    return rows
