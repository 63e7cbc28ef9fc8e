"""Efficient attention (survey §2.5.1): one module per family, one calling convention for all.

Every method is ``method(q, k, v, *, causal, **options) -> out`` on (B, H, T, D) tensors (``interface``), so
the chapter can time them side by side and ``use_attention`` can swap any of them into our Llama.

- ``interface``: the convention's checks, ``softmax_attention`` (the exact, quadratic reference), the swap.
- ``flash``: FlashAttention-2's tiled online softmax in plain PyTorch (exact; kernels/flash_attention.py is
  the Triton kernel).
- Feature reduction: ``nystrom`` (Nyströmformer). Kernel / low rank: ``linformer``, ``performer`` (FAVOR+),
  ``linear`` (Linear Transformer). Fixed patterns: ``sparse`` (Sparse Transformer, Longformer, Big Bird).
  Learnable pattern: ``reformer`` (LSH buckets with shared QK).
"""

from effref.attention.flash import flash_attention_tiled
from effref.attention.interface import AttentionSwap, check_qkv, expand_kv, softmax_attention, use_attention
from effref.attention.linear import (
    elu_feature_map,
    kernel_attention,
    linear_attention,
    linear_attention_recurrent,
)
from effref.attention.linformer import linformer_attention, linformer_projection
from effref.attention.nystrom import iterative_pinv, nystrom_attention, segment_means
from effref.attention.performer import favor_features, orthogonal_gaussian, performer_attention
from effref.attention.reformer import lsh_buckets, reformer_attention, shared_qk_attention
from effref.attention.sparse import (
    SparsePattern,
    bigbird_attention,
    fixed_pattern,
    longformer_attention,
    random_keys,
    sparse_attention,
    sparse_transformer_attention,
    strided_pattern,
    window_global_pattern,
)

__all__ = ["AttentionSwap", "SparsePattern", "bigbird_attention", "check_qkv", "elu_feature_map", "expand_kv",
           "favor_features", "fixed_pattern", "flash_attention_tiled", "iterative_pinv", "kernel_attention",
           "linear_attention", "linear_attention_recurrent", "linformer_attention", "linformer_projection",
           "longformer_attention", "lsh_buckets", "nystrom_attention", "orthogonal_gaussian",
           "performer_attention", "random_keys", "reformer_attention", "segment_means", "shared_qk_attention",
           "softmax_attention", "sparse_attention", "sparse_transformer_attention", "strided_pattern",
           "use_attention", "window_global_pattern"]
