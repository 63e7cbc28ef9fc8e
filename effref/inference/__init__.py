"""Efficient inference (survey §2.4): speculative decoding and KV-cache policies for our own LLaMA.

- ``decoding``: the shared verifier: a forward pass with explicit positions and a tree mask, greedy tree
  verification, moving an accepted path into place in the KV cache, and the draft-and-verify loop.
- ``speculative``: speculative sampling (Leviathan et al.; Chen et al.) and its greedy variant.
- ``drafts``: draft models that exist offline (SmolLM2 with layers skipped, optionally with a fitted lens).
- ``bild``, ``specinfer``, ``medusa``, ``llma``, ``lookahead``: the other draft-and-verify schemes.
- ``kv_policies``: StreamingLLM sinks + window, H2O, Scissorhands as ``KVCache`` subclasses.
- ``skipdecode``: SkipDecode's token-level early exit with a per-layer cache.
- ``flexgen``: FlexGen's offloading cost model (GPU/CPU/disk placement by linear programming, 4-bit compression).
- ``dejavu``: Deja Vu's contextual sparsity for SwiGLU MLP neurons and attention heads (importance, low-rank
  predictors, sparse MLP and sparse attention); ``dejavu_predictor`` holds the shared predictor and top-k
  selection, ``dejavu_heads`` the attention-head part.
"""

from effref.inference.bild import BiLDConfig, bild_generate
from effref.inference.drafts import layer_skip_draft
from effref.inference.flexgen import Hardware, Workload, search_policy
from effref.inference.kv_eval import decode_greedy, decode_nll
from effref.inference.kv_policies import H2OCache, ScissorhandsCache, StreamingCache
from effref.inference.llma import llma_generate
from effref.inference.lookahead import LookaheadConfig, lookahead_generate
from effref.inference.medusa import MedusaHeads, medusa_generate, train_medusa_heads
from effref.inference.skipdecode import SkipDecodeConfig, skipdecode_generate
from effref.inference.specinfer import specinfer_generate
from effref.inference.speculative import Sampling, SpeculativeConfig, speculative_generate, token_probs

# Deja Vu's pieces (importance, predictors, sparse MLP and heads) are imported from their modules.
__all__ = ["BiLDConfig", "H2OCache", "Hardware", "LookaheadConfig", "MedusaHeads", "Sampling", "ScissorhandsCache",
           "SkipDecodeConfig", "SpeculativeConfig", "StreamingCache", "bild_generate", "decode_greedy", "decode_nll",
           "layer_skip_draft", "llma_generate", "lookahead_generate", "medusa_generate", "skipdecode_generate",
           "search_policy", "specinfer_generate", "speculative_generate", "token_probs", "train_medusa_heads",
           "Workload"]
