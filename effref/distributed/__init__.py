"""Distributed pre-training (survey §2.2, system level), on real ``torch.distributed`` process groups.

- ``launch``: start a gloo job of N processes from Python (``run_ranks``), or join a ``torchrun`` job
  (``init_distributed``).
- ``data_parallel``: whole model on every rank, gradients averaged by a bucketed all-reduce that overlaps
  backward (``DataParallel``, ``split_batch``).
- ``zero``: ZeRO stages 0-3 on padded flat shards (``ZeroEngine``) and the paper's per-rank bytes
  (``model_state_bytes``); ``fsdp``: stage 3 unit by unit with prefetch (``FSDPEngine``); ``offload``:
  ZeRO-Offload, optimizer shard, states and step on the CPU (``ZeroOffload``).
- ``checkpointing``: activation checkpointing (``checkpoint``, ``checkpoint_modules``, ``saved_activation_bytes``).
- ``train``: one script for 1..N processes, ours or PyTorch's or DeepSpeed's engine
  (``python -m effref.distributed.train`` / ``torchrun -m effref.distributed.train``; import it from
  ``effref.distributed.train``, so that running it as a script does not load it twice).
"""

from effref.distributed.checkpointing import checkpoint, checkpoint_modules, saved_activation_bytes
from effref.distributed.data_parallel import DataParallel, split_batch
from effref.distributed.fsdp import FSDPEngine
from effref.distributed.launch import init_distributed, run_ranks
from effref.distributed.offload import ZeroOffload
from effref.distributed.zero import ZeroEngine, model_state_bytes

__all__ = ["DataParallel", "FSDPEngine", "ZeroEngine", "ZeroOffload", "checkpoint", "checkpoint_modules",
           "init_distributed", "model_state_bytes", "run_ranks", "saved_activation_bytes", "split_batch"]
