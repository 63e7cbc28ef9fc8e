"""Shared machinery of the compression methods (pruning, low-rank, quantization): calibration walk, save/load."""

from effref.compression.calibration import (
    STATS,
    InputStats,
    collect_input_stats,
    find_blocks,
    map_linears,
    walk_linears,
)
from effref.compression.hessian import damped_hessian, inverse_hessian_cholesky
from effref.compression.io import load_compressed, save_compressed

__all__ = ["STATS", "InputStats", "collect_input_stats", "damped_hessian", "find_blocks", "inverse_hessian_cholesky",
           "load_compressed", "map_linears", "save_compressed", "walk_linears"]
