"""Triton kernels for the book, each beside the plain-PyTorch reference it must agree with.

Every module here (``kernels/rmsnorm.py`` is the template) holds one Triton kernel, the launcher that checks
its arguments, a reference in eager PyTorch, and a ``BENCHMARK`` entry that ``python -m effref.kernels.bench``
picks up. The kernels run on a CUDA GPU; on a machine without one, Triton's *interpreter* runs the same kernel
source on CPU tensors (slowly: about 2.5 ms per program, so tests use small shapes and large blocks).

Where the modules live. In the repository they sit in the top-level ``kernels/`` folder, beside the book;
they are imported as ``effref.kernels`` only. That folder has no ``__init__.py`` on purpose: ``kernels`` is
the import name of Hugging Face's hub-kernels package, which transformers (5.25 and later) imports when a
model loads, so a package of ours under that name would break transformers or be hidden by it. This file is
the package's only ``__init__``: in a source checkout (editable install, or the repository on ``sys.path``)
it adds the ``kernels/`` folder to the package's ``__path__``; a built wheel carries the modules beside it
instead (``setup.py`` copies them there). ``KERNELS_DIR`` is that folder either way, ``RESULTS_DIR`` its
measured GPU results.

The interpreter switch. Triton decides between compiling and interpreting when a ``@triton.jit`` decorator
runs, by reading ``TRITON_INTERPRET``. ``import effref`` runs this ``__init__`` before anything else, and
before any kernel module, so it settles the variable here, once:

1. ``EFFREF_TRITON_INTERPRET=1`` or ``=0``, if set, wins;
2. else a ``TRITON_INTERPRET`` that the caller already exported is respected;
3. else the interpreter is used exactly when no CUDA GPU is present.

Step 3 must stay cheap and must not poison ``fork()``: a CPU-only torch build answers without touching any
driver, and on a CUDA build the question goes to NVML (``PYTORCH_NVML_BASED_CUDA_CHECK=1``) rather than
``cuInit``, which would leave forked children unable to use the GPU. This file imports neither triton nor
any kernel module.

Public names: ``INTERPRETED`` (bool), ``INTERPRET_REASON`` (why), ``triton_available()``, ``describe()``,
``KERNELS_DIR``, ``RESULTS_DIR``.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from effref.checks import ON_WORDS, on_off

_CHECKOUT_KERNELS = Path(__file__).resolve().parents[2] / "kernels"  # the repository's kernels/ folder
if not Path(__file__).with_name("_runtime.py").is_file() and (_CHECKOUT_KERNELS / "_runtime.py").is_file():
    __path__.append(str(_CHECKOUT_KERNELS))  # a source checkout: the modules live in kernels/, not beside us
KERNELS_DIR = Path(__path__[-1])  # the folder of the kernel modules (and of results/)
RESULTS_DIR = KERNELS_DIR / "results"  # <device>.json files written by kernels/measure_on_gpu.sh


def cuda_gpu_present() -> bool:
    """True when a CUDA (or ROCm) GPU is visible, asked without initialising the CUDA driver if possible."""
    if not torch.backends.cuda.is_built():
        return False  # a CPU-only wheel: no driver to ask
    if torch.cuda.is_initialized():
        return torch.cuda.is_available()  # CUDA is already up; asking again costs nothing
    saved = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # ask NVML: fork() stays usable
    try:
        return torch.cuda.is_available()
    finally:
        if saved is None:
            del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
        else:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = saved


def resolve_interpret(environ: Mapping[str, str], gpu_present: Callable[[], bool]) -> tuple[bool, str]:
    """Decide whether Triton should interpret, and say why (rules 1-3 of the module docstring)."""
    override = environ.get("EFFREF_TRITON_INTERPRET")
    if override is not None and override.strip():
        on = on_off("EFFREF_TRITON_INTERPRET", override, "1 (interpret on CPU) or 0 (compile for the GPU), or "
                    "unset it to decide from the hardware")
        return on, f"EFFREF_TRITON_INTERPRET={override.strip()}"
    preset = environ.get("TRITON_INTERPRET")
    if preset is not None:
        return preset.strip().lower() in ON_WORDS, f"TRITON_INTERPRET={preset} was already set"
    if gpu_present():
        return False, "a CUDA GPU is present"
    return True, "no CUDA GPU is present"


INTERPRETED, INTERPRET_REASON = resolve_interpret(os.environ, cuda_gpu_present)
# Triton wraps its own language functions (tl.zeros, tl.cdiv, ...) when it is first imported. If something
# (transformers, when a model loads) imported it before this switch was set, those wrappers compile for a GPU,
# and kernels fail under the interpreter with "Cannot call @triton.jit'd outside of the scope of a kernel".
# ``import effref`` imports this package first, which avoids it; the launchers check this flag to say so.
TRITON_IMPORTED_TOO_EARLY = (INTERPRETED and "triton" in sys.modules
                             and os.environ.get("TRITON_INTERPRET", "").strip().lower() not in ON_WORDS)
os.environ["TRITON_INTERPRET"] = "1" if INTERPRETED else "0"


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` works (the optional ``effref[triton]`` extra, Linux only)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def describe() -> str:
    """One line for logs and chapter outputs: Triton version and whether it compiles or interprets."""
    if not triton_available():
        return "Triton is not installed (pip install 'effref[triton]'); only the PyTorch references run"
    import triton

    mode = "interpreter on CPU tensors" if INTERPRETED else "compiled for the GPU"
    return f"Triton {triton.__version__}, {mode} ({INTERPRET_REASON})"
