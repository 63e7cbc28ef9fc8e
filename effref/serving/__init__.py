"""Serving (survey §2.4, system level): a paged KV cache, continuous batching and a small engine.

- ``paged_attention``: attention of one decode query per sequence over scattered KV blocks (PyTorch
  reference of PagedAttention, Kwon et al. 2023).
"""

from effref.serving.paged_attention import gather_kv, paged_attention

__all__ = ["gather_kv", "paged_attention"]
