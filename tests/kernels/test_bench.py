"""The bench command on CPU: ``--check`` runs every kernel's check shapes under the interpreter, in one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from effref import kernels
from effref.kernels.bench import discover

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not kernels.triton_available(), reason="Triton is not installed")
def test_bench_check_covers_every_kernel_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    command = [sys.executable, "-m", "effref.kernels.bench", "--check", "--out", str(out)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["mode"] == "check" and report["triton"]
    entries, errors = discover()
    assert not errors
    assert {"rmsnorm", "w4a16", "w8a8", "sparse24", "paged_attention", "flash_decoding"} <= {b.name for b in entries}
    checked = {(r["kernel"], r["dtype"], tuple(r["shape"])) for r in report["results"]}
    expected = {(b.name, str(d).removeprefix("torch."), tuple(s)) for b in entries for d in b.dtypes
                for s in b.check_shapes}
    assert checked == expected  # every entry, every dtype, every check shape, each agreeing with its reference
