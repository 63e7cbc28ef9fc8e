"""Transformer alternatives (survey §2.5.4): sequence models whose past is a fixed-size state, not a KV cache.

- ``recurrent``: the shared machinery: the linear recurrence h_t = a_t h_{t−1} + b_t as a loop and as a
  parallel (doubling) scan, and ``RecurrentLM`` (generation from a state, exact save / load).
- ``mamba``: Mamba's selective state-space model (Gu & Dao 2023), block and language model.
- ``rwkv``: RWKV-4 (Peng et al. 2023): time mixing with the WKV operator, channel mixing, token shift.
"""

from effref.alternatives.mamba import Mamba, MambaConfig, selective_scan_parallel, selective_scan_sequential
from effref.alternatives.recurrent import RecurrentLM, scan_parallel, scan_sequential
from effref.alternatives.rwkv import RWKV, RWKVConfig, wkv_parallel, wkv_recurrent

__all__ = ["RWKV", "Mamba", "MambaConfig", "RWKVConfig", "RecurrentLM", "scan_parallel", "scan_sequential",
           "selective_scan_parallel", "selective_scan_sequential", "wkv_parallel", "wkv_recurrent"]
