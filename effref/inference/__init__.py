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
