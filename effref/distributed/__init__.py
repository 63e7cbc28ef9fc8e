"""Distributed pre-training (survey §2.2, system level), on real ``torch.distributed`` process groups.

- ``launch``: start a gloo job of N processes from Python (``run_ranks``), or join a ``torchrun`` job
  (``init_distributed``).
"""

from effref.distributed.launch import init_distributed, run_ranks

__all__ = ["init_distributed", "run_ranks"]
