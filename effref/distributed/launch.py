"""Start a real multi-process job on one machine, or join one that ``torchrun`` started.

Every strategy of this subpackage runs on ``torch.distributed``: gloo on a CPU, NCCL across GPUs. Two ways in:

- ``run_ranks("pkg.module:function", world_size, *args)`` spawns ``world_size`` fresh Python processes, each
  of which joins a gloo group (a file rendezvous in a temporary folder, so no network port is needed), calls
  ``function(*args)`` and sends back what it returns (the function is named by its module, or by the path of
  its file, which suits tests and scripts). The processes are killed if they outlive ``timeout_s``,
  and a failing rank's log is raised in the error. Tests and chapters use this.
- ``init_distributed()`` joins the group that a launcher set up through the environment (``torchrun`` sets
  ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), with NCCL when a GPU is present, else gloo.
  Without those variables it starts a group of one, so one script runs on 1..N processes unchanged.

Left out: multi-node rendezvous (``torchrun`` does it), elastic restarts.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def _resolve(target: str):
    """'package.module:function' or 'path/to/file.py:function' -> the function."""
    module, sep, name = target.rpartition(":")
    if not sep or not module or not name:
        raise ValueError(f"target={target!r} must read 'package.module:function' or 'path/file.py:function'")
    if module.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(module).stem, module)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
    else:
        loaded = importlib.import_module(module)
    return getattr(loaded, name)


def run_ranks(target: str, world_size: int, *args: Any, timeout_s: float = 180, threads: int = 1) -> list[Any]:
    """Run ``target(*args)`` on ``world_size`` gloo ranks in fresh processes; return the results by rank."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be a positive int (the number of processes)")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s!r} must be > 0")
    _resolve(target)  # fail here, not in every child, when the function does not exist
    with tempfile.TemporaryDirectory(prefix="effref-ranks-") as folder:
        torch.save(args, Path(folder) / "args.pt")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        procs = [subprocess.Popen([sys.executable, "-m", "effref.distributed.launch", target, str(rank),
                                   str(world_size), folder], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for rank in range(world_size)]
        logs = []
        try:
            for proc in procs:
                logs.append(proc.communicate(timeout=timeout_s)[0])
        except subprocess.TimeoutExpired as timeout:
            raise RuntimeError(f"{target} on {world_size} ranks did not finish within timeout_s={timeout_s}") \
                from timeout
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        failed = [rank for rank, proc in enumerate(procs) if proc.returncode != 0]
        if failed:
            raise RuntimeError(f"{target}: rank {failed[0]} of {world_size} failed:\n{logs[failed[0]][-4000:]}")
        return [torch.load(Path(folder) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def init_distributed() -> tuple[int, int]:
    """Join the process group a launcher described in the environment (or a group of one); return (rank, world)."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)
        else:
            with tempfile.NamedTemporaryFile(prefix="effref-rendezvous-", delete=False) as handle:
                rendezvous = handle.name
            os.unlink(rendezvous)
            dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=0, world_size=1)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def _child(target: str, rank: int, world_size: int, folder: str) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size)
    try:
        args = torch.load(Path(folder) / "args.pt", weights_only=False)
        torch.save(_resolve(target)(*args), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
