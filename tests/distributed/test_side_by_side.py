"""The ZeRO rows of the frameworks comparison: our stages train exactly as torch's and DeepSpeed's engines do."""

import importlib.util

import pytest

from effref.distributed import side_by_side, zero_side_by_side


def test_every_pair_trains_the_same_loss_curve():
    rows = zero_side_by_side(world_size=2, steps=3)
    assert [(r["library"], r["comparison"].split()[0]) for r in rows] == [
        (library, stage) for _, _, library, stage in side_by_side.PAIRS]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["agreement"] < 1e-5 and row["time_ratio"] > 0


def test_without_deepspeed_its_rows_say_why(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    rows = zero_side_by_side(world_size=2, steps=2)
    missing = [r for r in rows if r["library"] == "DeepSpeed"]
    assert len(missing) == 3 and all(r["status"] == "unavailable" and "deepspeed" in r["reason"] for r in missing)
    assert all(r["status"] == "ok" for r in rows if r["library"] != "DeepSpeed")


@pytest.mark.parametrize("world_size", [0, -1])
def test_bad_world_sizes_are_refused(world_size):
    with pytest.raises(ValueError, match="world_size"):
        zero_side_by_side(world_size=world_size)
