"""Device choice, seeding and the quick/paper scale switch every chapter uses.

The book runs on a 2-core laptop and on a GPU Colab from the same notebook. Two knobs make that work, and
one progress bar serves both:

- ``get_device()`` picks cuda → mps → cpu (override with ``EFFREF_DEVICE``).
- ``progress_bar`` is the tqdm bar every long loop uses (a widget in notebooks that have ipywidgets). Bars
  show in a notebook (a chapter, or coursework in Jupyter or Colab) and stay off in scripts and tests, where a
  library call should print nothing; ``EFFREF_PROGRESS=1`` or ``=0`` decides instead. The book's stored outputs
  (the test run and the book build set 0) show results, not bars, which would render as stderr blocks.
- ``get_scale()`` returns a :class:`Scale`: how many evaluation windows, calibration samples and training
  steps a chapter may spend. ``EFFREF_SCALE=quick|paper|auto`` chooses; ``auto`` (the default) means
  *paper* on a CUDA GPU and *quick* everywhere else.
- ``BACKEND_IMPORT_NOISE``: the few messages optional libraries log when imported on a CPU-only machine (torchao's
  missing CUDA extensions, which transformers and peft probe), filtered out of their loggers.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch

from effref.checks import on_off

try:  # notebook progress widgets need ipywidgets; without it tqdm.auto warns, so fall back to text bars
    import ipywidgets  # noqa: F401
    from tqdm.auto import tqdm
except ImportError:
    from tqdm import tqdm

SCALE_NAMES = ("quick", "paper")
# What optional backends log when they are imported on a machine without a GPU, and which says nothing about the
# work at hand: torchao (which transformers probes as soon as a model class is touched, and peft too) cannot load
# its CUDA extensions and sets off a torch deprecation warning about its enums; bitsandbytes finds no hub kernel for
# its CPU path, and its hub-kernel loader says, offline, that it skips a trust check for a kernel already cached.
# A filter on each of those loggers drops exactly these messages (and nothing else they log), so that
# chapters show no stderr block for them. Installed once, when effref is imported.
BACKEND_IMPORT_NOISE = {
    "torchao": ("Failed to load ",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "kernels._internals.hf_hub": ("Skipping publisher trust check",),  # offline: a cached hub kernel is used
}


class _DropBackendImportNoise(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(part in message for part in self.starts)


for _name, _parts in BACKEND_IMPORT_NOISE.items():
    logging.getLogger(_name).addFilter(_DropBackendImportNoise(_parts))


def in_notebook() -> bool:
    """True inside a Jupyter kernel (a chapter, Colab), False in a script, a test or a plain IPython shell."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in shell.config


def progress_enabled() -> bool:
    """``EFFREF_PROGRESS`` when it is set, else whether we run in a notebook."""
    value = os.environ.get("EFFREF_PROGRESS", "")
    if not value.strip():
        return in_notebook()
    return on_off("EFFREF_PROGRESS", value, "1 (show progress bars) or 0 (hide them)")


def progress_bar(iterable=None, *, disable: bool = False, **options) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one with ``total=``), hidden when ``disable`` or when
    ``EFFREF_PROGRESS=0``; ``options`` are tqdm's (``desc``, ``total``, ``unit``, ``leave``, ...)."""
    return tqdm(iterable, disable=disable or not progress_enabled(), **options)


def get_device(prefer: str | None = None) -> torch.device:
    """Return the best available device: ``prefer``, else ``$EFFREF_DEVICE``, else cuda → mps → cpu."""
    choice = prefer or os.environ.get("EFFREF_DEVICE")
    if choice:
        device = torch.device(choice)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device={choice!r} was asked for but CUDA is not available; use 'cpu'")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError(f"device={choice!r} was asked for but MPS is not available; use 'cpu'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class Scale:
    """How much work a chapter may do. Every number a chapter prints is labelled with ``describe()``."""

    name: str
    eval_windows: int | None  # perplexity windows of `window` tokens; None = the whole split
    window: int  # tokens per perplexity window
    calib_samples: int  # calibration sequences for compression methods
    calib_len: int  # tokens per calibration sequence
    train_steps: int  # optimisation steps for fine-tuning / distillation demos
    gen_tokens: int  # new tokens for throughput measurements

    def describe(self) -> str:
        windows = "all" if self.eval_windows is None else str(self.eval_windows)
        return (f"{self.name} scale: perplexity on {windows} × {self.window}-token windows of Emma, "
                f"{self.calib_samples} × {self.calib_len}-token calibration samples")


SCALES = {
    # The book's one evaluation protocol on a CPU: the first 2 disjoint 512-token windows of Emma, ~1.3 s each for
    # SmolLM2 on 2 cores, so a chapter can afford to score a dozen variants; every chapter that reports SmolLM2's
    # perplexity on Emma scores exactly these windows (and prints scale.describe()).
    "quick": Scale("quick", eval_windows=2, window=512, calib_samples=16, calib_len=256,
                   train_steps=30, gen_tokens=32),
    # The papers' protocol: the full test split in 2048-token windows, 128 × 2048 calibration tokens.
    "paper": Scale("paper", eval_windows=None, window=2048, calib_samples=128, calib_len=2048,
                   train_steps=1000, gen_tokens=256),
}


def get_scale(name: str | None = None) -> Scale:
    """Return the scale named ``name``, else ``$EFFREF_SCALE``; ``auto`` = paper on CUDA, quick otherwise."""
    choice = (name or os.environ.get("EFFREF_SCALE") or "auto").lower()
    if choice == "auto":
        choice = "paper" if torch.cuda.is_available() else "quick"
    if choice not in SCALES:
        raise ValueError(f"scale={choice!r} is not known; use one of {SCALE_NAMES} or 'auto' "
                         "(set EFFREF_SCALE or pass name=)")
    return SCALES[choice]
