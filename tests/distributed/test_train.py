"""The documented command, ``torchrun -m effref.distributed.train``, on 2 processes (its ``python -m`` form is the
same code on a group of one)."""

import os
import re
import subprocess
import sys
from pathlib import Path

from effref.distributed.train import TrainConfig, train

BIN = Path(sys.executable).parent


def losses_printed(command):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, check=True).stdout
    return [float(x) for x in re.findall(r"^step +\d+ +loss (\S+)$", out, flags=re.MULTILINE)]


def test_torchrun_on_two_processes_prints_the_single_process_curve():
    reference = train(TrainConfig(engine="single", steps=3))["losses"]
    printed = losses_printed([str(BIN / "torchrun"), "--nproc-per-node", "2", "-m", "effref.distributed.train",
                              "--engine", "effref-zero3", "--steps", "3"])
    assert len(printed) == 3
    assert max(abs(a - b) for a, b in zip(printed, reference)) < 1e-4  # printed with 4 decimals

