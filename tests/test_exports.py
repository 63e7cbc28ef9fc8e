"""Each subpackage exports the calls a user starts from, and every exported name exists."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import effref

PACKAGES = [f"effref.{info.name}" for info in pkgutil.iter_modules(effref.__path__) if info.ispkg
            and importlib.import_module(f"effref.{info.name}").__dict__.get("__all__") is not None]


def test_the_technique_packages_have_exports():
    assert {"effref.quantization", "effref.pruning", "effref.inference", "effref.peft"} <= set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_exists(package):
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ names {missing}, which it does not define"


@pytest.mark.parametrize("package, suffixes", [
    ("effref.quantization", ("_model",)),
    ("effref.pruning", ("_prune_model", "llm_prune")),
    ("effref.inference", ("_generate",)),
])
def test_every_model_level_call_is_exported(package, suffixes):
    # a model-level entry point defined in any module of the package is reachable from the package itself
    root = importlib.import_module(package)
    defined = set()
    for info in pkgutil.iter_modules(root.__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        defined |= {name for name, obj in vars(module).items() if inspect.isfunction(obj)
                    and obj.__module__ == module.__name__ and not name.startswith("_") and name.endswith(suffixes)}
    helpers = {"quantize_model", "tree_generate", "train_language_model"}  # drivers and training, not techniques
    hidden = sorted(defined - set(root.__all__) - helpers)
    assert not hidden, f"{package} does not export {hidden}"


CORE_ONLY = r"""
import importlib, pkgutil, sys
for extra in ("matplotlib", "pandas", "jupytext", "gguf", "accelerate", "rdata", "ipywidgets", "peft", "datasets"):
    sys.modules[extra] = None  # as if only the core dependencies were installed
import effref
skipped = {"effref.plotting"}  # the notebook extra's module
for info in pkgutil.walk_packages(effref.__path__, "effref."):
    if info.name not in skipped and not info.name.endswith("__main__"):
        importlib.import_module(info.name)
print("imported", len(sys.modules))
"""


def test_the_library_imports_with_the_core_dependencies_only():
    # the extras (notebook, assets, book, test, hub) hold tools the library itself does not import
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", CORE_ONLY], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
