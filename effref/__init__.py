"""effref: Efficient LLMs, a runnable reference book.

One readable module per technique of the survey *Efficient Large Language Models* (Wan et al.), written from
scratch in PyTorch, plus the lab bench every chapter measures on: a real pretrained model (``effref.models``),
real text (``effref.data``), the assets they come from (``effref.assets``) and the measurements
(``effref.eval`` for quality and speed, ``effref.memory`` for bytes).
"""

# Settle Triton's interpreter switch before anything (transformers, via load_model) imports triton: a triton
# imported first compiles for a GPU that is not there, and our kernels then fail on CPU. ``effref.kernels``
# imports neither triton nor any kernel here, only sets TRITON_INTERPRET (see effref/kernels/__init__.py).
from effref import kernels  # noqa: F401  (isort: the first import on purpose)
from effref.runtime import Scale, get_device, get_scale, seed_everything

__version__ = "0.1.0"
__all__ = ["Scale", "__version__", "get_device", "get_scale", "seed_everything"]
