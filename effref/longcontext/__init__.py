"""Long-context LLMs (survey §2.5.3): running a model past its training length, and reading more context than
full attention can afford.

Positions:
- ``positions``: the shared machinery: install RoPE tables on our Llama, run it at explicit position ids, and
  an attention with rotate/bias hooks for the schemes that are not a table of angles.
- ``rope_scaling``: position interpolation (PI), NTK-aware scaling, dynamic NTK, YaRN and Llama 3's bands, for
  our Llama (``Llama.from_hf`` reads them from scaled checkpoints) and as transformers ``rope_parameters``.
- ``alibi``: ALiBi's linear biases and geometric head slopes.
- ``xpos``: xPOS, RoPE with an exponential decay.
- ``pose``: PoSE's skip-wise position ids, and the training loop that uses them.
Recurrence:
- ``transformer_xl``: Transformer-XL's segment-level recurrence and relative position scores.
- ``rmt``: the Recurrent Memory Transformer: memory tokens read and written around every segment.
- ``retnet``: RetNet's retention in its parallel, recurrent and chunk-wise forms, and multi-scale retention.
Windows and segments:
- ``sliding_window``: Mistral's sliding-window attention and its rolling-buffer KV cache (StreamingLLM's sinks
  + window is ``effref.inference.kv_policies.StreamingCache``).
- ``pcw``: Parallel Context Windows: windows encoded side by side at shared positions, read by the task tokens.
- ``longnet``: LongNet's dilated attention and its mixture over (segment, dilation) patterns.
Memory retrieval:
- ``knn_memory``: Memorizing Transformers' kNN-augmented attention over an external memory (exact search).
- ``landmark``: Landmark attention's grouped softmax and top-k block retrieval.
"""

from effref.longcontext.alibi import ALiBiAttention, alibi_bias, alibi_slopes, use_alibi
from effref.longcontext.knn_memory import KNNMemory, knn_attention, knn_augmented_attention
from effref.longcontext.landmark import block_mean_keys, grouped_softmax_weights, landmark_attention
from effref.longcontext.longnet import dilated_attention, dilated_mask
from effref.longcontext.pcw import ParallelContextCache, parallel_context_cache, pcw_generate, pcw_logits
from effref.longcontext.pose import PoSEConfig, pose_batch, pose_position_ids, train_context
from effref.longcontext.positions import PositionalAttention, at_positions, install_rope_tables, swap_attention
from effref.longcontext.retnet import (MultiScaleRetention, retention_chunkwise, retention_gammas, retention_parallel,
                                       retention_recurrent)
from effref.longcontext.rmt import RecurrentMemoryTransformer
from effref.longcontext.rope_scaling import (RopeScaling, hf_rope_kwargs, scaled_inv_freq, scaled_rope_tables,
                                             scaling_from_hf, use_rope_scaling)
from effref.longcontext.sliding_window import (SlidingWindowAttention, SlidingWindowCache, sliding_window_attention,
                                               sliding_window_mask, use_sliding_window)
from effref.longcontext.transformer_xl import RelativeAttention, TransformerXL
from effref.longcontext.xpos import XPosAttention, use_xpos, xpos_decay, xpos_scale

__all__ = ["ALiBiAttention", "KNNMemory", "MultiScaleRetention", "ParallelContextCache", "PoSEConfig",
           "PositionalAttention", "RecurrentMemoryTransformer", "RelativeAttention", "RopeScaling",
           "SlidingWindowAttention", "SlidingWindowCache", "TransformerXL", "XPosAttention", "alibi_bias",
           "alibi_slopes", "at_positions", "block_mean_keys", "dilated_attention", "dilated_mask",
           "grouped_softmax_weights", "hf_rope_kwargs", "install_rope_tables", "knn_attention",
           "knn_augmented_attention", "landmark_attention", "parallel_context_cache", "pcw_generate", "pcw_logits",
           "pose_batch", "pose_position_ids", "retention_chunkwise", "retention_gammas", "retention_parallel",
           "retention_recurrent", "scaled_inv_freq", "scaled_rope_tables", "scaling_from_hf",
           "sliding_window_attention", "sliding_window_mask", "swap_attention", "train_context", "use_alibi",
           "use_rope_scaling", "use_sliding_window", "use_xpos", "xpos_decay", "xpos_scale"]
