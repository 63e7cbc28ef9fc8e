"""Long-context LLMs (survey §2.5.3): position schemes that let a model run past its training length.

- ``positions``: the shared machinery: install RoPE tables on our Llama, run it at explicit position ids, and
  an attention with rotate/bias hooks for the schemes that are not a table of angles.
- ``rope_scaling``: position interpolation (PI), NTK-aware scaling, dynamic NTK, YaRN and Llama 3's bands, for
  our Llama (``Llama.from_hf`` reads them from scaled checkpoints) and as transformers ``rope_parameters``.
- ``alibi``: ALiBi's linear biases and geometric head slopes.
- ``transformer_xl``: Transformer-XL's segment-level recurrence and relative position scores.
- ``xpos``: xPOS, RoPE with an exponential decay.
- ``pose``: PoSE's skip-wise position ids, and the training loop that uses them.
- ``knn_memory``: Memorizing Transformers' kNN-augmented attention over an external memory (exact search).
- ``landmark``: Landmark attention's grouped softmax and top-k block retrieval.
- ``longnet``: LongNet's dilated attention and its mixture over (segment, dilation) patterns.
- ``pcw``: Parallel Context Windows: windows encoded side by side at shared positions, read by the task tokens.
- ``rmt``: the Recurrent Memory Transformer: memory tokens read and written around every segment.
- ``retnet``: RetNet's retention in its parallel, recurrent and chunk-wise forms, and multi-scale retention.
- ``sliding_window``: Mistral's sliding-window attention and its rolling-buffer KV cache.
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

__all__ = ["ALiBiAttention", "MultiScaleRetention", "retention_chunkwise", "retention_gammas", "retention_parallel",
           "retention_recurrent", "ParallelContextCache", "parallel_context_cache", "pcw_generate", "pcw_logits",
           "dilated_attention", "dilated_mask", "KNNMemory", "knn_attention",
           "knn_augmented_attention", "block_mean_keys", "grouped_softmax_weights", "landmark_attention", "RelativeAttention",
           "TransformerXL", "RecurrentMemoryTransformer", "PoSEConfig", "PositionalAttention", "RopeScaling", "XPosAttention", "alibi_bias",
           "alibi_slopes", "at_positions", "hf_rope_kwargs", "install_rope_tables",
           "pose_batch", "pose_position_ids", "scaled_inv_freq", "scaled_rope_tables", "scaling_from_hf",
           "SlidingWindowAttention", "SlidingWindowCache", "sliding_window_attention", "sliding_window_mask",
           "swap_attention", "train_context", "use_alibi", "use_rope_scaling", "use_sliding_window", "use_xpos", "xpos_decay",
           "xpos_scale"]
