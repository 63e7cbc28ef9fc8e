"""effref: Efficient LLMs, a runnable reference book.

One readable module per technique of the survey *Efficient Large Language Models* (Wan et al.), written from
scratch in PyTorch, plus the lab bench every chapter measures on: a real pretrained model (``effref.models``),
real text (``effref.data``), the assets they come from (``effref.assets``) and the measurements
(``effref.eval``).
"""

from effref.runtime import Scale, get_device, get_scale, seed_everything

__version__ = "0.1.0"
__all__ = ["Scale", "get_device", "get_scale", "seed_everything", "__version__"]
