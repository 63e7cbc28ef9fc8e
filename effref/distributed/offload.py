"""ZeRO-Offload: the optimizer's states, the gradients it reads and its step live in host (CPU) memory.

Paper: Ren, Rajbhandari, Aminabadi, Ruwase, Yang, Zhang, Li, He (2021), "ZeRO-Offload: Democratizing
Billion-Scale Model Training", USENIX ATC, arXiv:2101.06840 — §4 (the offload strategy), Figure 2 (data flow).
Implements the paper's data flow on top of ZeRO stage 2 (or 1 or 3) of effref.distributed.zero: backward on the
accelerator → the reduce-scattered gradient shard copied to the host → the optimizer step on the host, against
an fp32 master copy of the rank's parameter shard → the updated shard copied back and all-gathered. Per rank,
with fp32 parameters (the paper's fp16 parameters and gradients are 2 bytes, K = 12):
    accelerator: 4Ψ bytes of parameters    (stage 2; stage 1 keeps its whole 4Ψ gradient there too, stage 3
                                            holds only the units in use)
    host:        (4 + 4 + 8)·Ψ/N_d bytes: master shard, gradient shard, Adam's m and v
Glossary: Ψ parameters · N_d ranks · "GPU" → the device the model lives on · "CPU" → ``host``.
Left out: the paper's vectorised CPU-Adam (any torch optimizer steps on the host here), the one-step delayed
parameter update (DPU) that overlaps the CPU step with the next backward, pinned-memory double buffering, and
fp16. On a machine without an accelerator host and device are the same memory: the copies still happen (the
host shard is a tensor of its own), and ``placement_bytes`` counts by the place each tensor is meant for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from effref.distributed.zero import ZeroEngine, storage_bytes


class ZeroOffload(ZeroEngine):
    """ZeRO ``stage`` 1–3 with the optimizer's shard, states and step on ``host`` (default ``"cpu"``)."""

    def __init__(self, model: nn.Module, optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
                 stage: int = 2, units: Iterable[nn.Module] = (), host: torch.device | str = "cpu") -> None:
        if stage not in (1, 2, 3) or isinstance(stage, bool):
            raise ValueError(f"stage={stage!r}: offload moves a partitioned optimizer, so use stage 1, 2 or 3 "
                             f"(ZeRO-Offload builds on 2)")
        super().__init__(model, stage, optimizer, units, optimizer_device=host)

    def placement_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for the model on the accelerator side and for the optimizer on the host side."""
        states = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        host = [u.shard for u in self.units] + [u.shard.grad for u in self.units] + states
        device = [u.flat for u in self.units] + [u.full_grad for u in self.units]
        return {"accelerator": storage_bytes(device), "host": storage_bytes(host)}
