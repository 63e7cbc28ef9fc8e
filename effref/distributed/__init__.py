"""Distributed pre-training (survey §2.2, system level), on real ``torch.distributed`` process groups.

- ``launch``: start a gloo job of N processes from Python (``run_ranks``), or join a ``torchrun`` job
  (``init_distributed``).
- ``data_parallel``: whole model on every rank, gradients averaged by a bucketed all-reduce that overlaps
  backward (``DataParallel``, ``split_batch``).
- ``zero``: ZeRO stages 0-3 on padded flat shards (``ZeroEngine``) and the paper's per-rank bytes
  (``model_state_bytes``); ``fsdp``: stage 3 unit by unit with prefetch (``FSDPEngine``); ``offload``:
  ZeRO-Offload, optimizer shard, states and step on the CPU (``ZeroOffload``).
- ``checkpointing``: activation checkpointing (``checkpoint``, ``checkpoint_modules``, ``saved_activation_bytes``).
- ``tensor_parallel``: Megatron's column- and row-parallel linears, attention split by heads, the MLP split
  (``ParallelBlock`` around a ``DenseBlock``); ``pipeline``: GPipe and 1F1B micro-batch schedules, as data and on
  real ranks (``pipeline_train_step``).
- ``simulator``: memory and communication per GPU for every strategy at any scale (``memory_per_gpu``); ``cost``:
  the survey's Table 1 and the 6·N·D FLOPs calculator (``training_flops``).
- ``side_by_side``: our ZeRO stages against ZeroRedundancyOptimizer, FSDP2 and DeepSpeed, as comparison rows
  (``zero_side_by_side``).
- ``train``: one script for 1..N processes, ours or PyTorch's or DeepSpeed's engine
  (``python -m effref.distributed.train`` / ``torchrun -m effref.distributed.train``; import it from
  ``effref.distributed.train``, so that running it as a script does not load it twice).
"""

from effref.distributed.checkpointing import checkpoint, checkpoint_modules, saved_activation_bytes
from effref.distributed.cost import TABLE_1, training_flops
from effref.distributed.data_parallel import DataParallel, split_batch
from effref.distributed.fsdp import FSDPEngine
from effref.distributed.launch import init_distributed, run_ranks
from effref.distributed.offload import ZeroOffload
from effref.distributed.pipeline import gpipe_schedule, one_f_one_b_schedule, pipeline_train_step, simulate_schedule
from effref.distributed.side_by_side import zero_side_by_side
from effref.distributed.simulator import bubble_fraction, communication_elements, memory_per_gpu
from effref.distributed.tensor_parallel import (ColumnParallelLinear, DenseBlock, ParallelBlock, ParallelMLP,
                                                ParallelSelfAttention, RowParallelLinear)
from effref.distributed.zero import ZeroEngine, model_state_bytes

__all__ = ["TABLE_1", "ColumnParallelLinear", "DataParallel", "DenseBlock", "FSDPEngine", "ParallelBlock",
           "ParallelMLP", "ParallelSelfAttention", "RowParallelLinear", "ZeroEngine", "ZeroOffload", "bubble_fraction",
           "checkpoint", "checkpoint_modules", "communication_elements", "gpipe_schedule", "init_distributed",
           "memory_per_gpu", "model_state_bytes", "one_f_one_b_schedule", "pipeline_train_step", "run_ranks",
           "saved_activation_bytes", "simulate_schedule", "split_batch", "training_flops", "zero_side_by_side"]
