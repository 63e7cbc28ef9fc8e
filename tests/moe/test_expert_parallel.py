"""Expert parallelism on 2 gloo processes: outputs and gradients equal the single-process layer's.

Each rank is a fresh Python process (``subprocess``) that rendezvouses through a file, so the test needs no
network port, and both are killed if they have not finished within TIMEOUT_S.
"""

import runpy
import subprocess
import sys

import pytest
import torch

from effref.moe import ExpertParallelMoE

WORLD, TIMEOUT_S = 2, 180

BUILD = """
import torch
from effref.moe import Experts, MoELayer, TopKRouter

def build(E, k, world=2, seed=0):
    torch.manual_seed(seed)
    layer = MoELayer(TopKRouter(16, E, k), Experts(E, 16, 12))
    with torch.no_grad():
        layer.router.gate.weight.mul_(50)  # unbalanced loads, so the all-to-all sends unequal splits
        for p in layer.experts.parameters():
            p.mul_(15)
    x = torch.randn(world, 3, 10, 16)  # batch r belongs to rank r
    probe = torch.randn(world, 3, 10, 16)  # loss = sum(y * probe): non-trivial gradients
    return layer, x, probe
"""

WORKER = BUILD + """
import sys
import torch.distributed as dist
from effref.moe import ExpertParallelMoE

rank, E, k, folder = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
layer, x, probe = build(E, k)
ep = ExpertParallelMoE(layer)
xr = x[rank].clone().requires_grad_(True)
y = ep(xr)
(y * probe[rank]).sum().backward()
ep.sync_replicated_grads()
torch.save({"y": y.detach(), "x_grad": xr.grad, "router_grad": ep.router.gate.weight.grad,
            "expert_grads": [p.grad for p in ep.experts.parameters()]}, f"{folder}/rank{rank}.pt")
dist.destroy_process_group()
"""


def build(E, k, folder):
    (folder / "build.py").write_text(BUILD)
    return runpy.run_path(str(folder / "build.py"))["build"](E, k, WORLD)


@pytest.mark.parametrize("E, k", [(4, 2), (2, 1), (6, 3)])
def test_two_processes_equal_one(tmp_path, E, k):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(E), str(k), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]

    layer, x, probe = build(E, k, tmp_path)
    x = x.clone().requires_grad_(True)
    y = layer(x.view(WORLD * 3, 10, 16)).view_as(x)  # the whole batch in one process
    (y * probe).sum().backward()
    n_local = E // WORLD
    for r in range(WORLD):
        res = torch.load(tmp_path / f"rank{r}.pt")
        torch.testing.assert_close(res["y"], y[r].detach(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(res["x_grad"], x.grad[r], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(res["router_grad"], layer.router.gate.weight.grad, rtol=1e-4, atol=1e-4)
        for mine, full in zip(res["expert_grads"], layer.experts.parameters()):
            torch.testing.assert_close(mine, full.grad[r * n_local:(r + 1) * n_local], rtol=1e-4, atol=1e-4)
    load = layer.routing.load()
    assert y.abs().max() > 1 and load.max() > load.min()  # real outputs, unequal all-to-all splits


def test_refuses_to_run_without_a_process_group(tmp_path):
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(build(4, 2, tmp_path)[0])
