"""effref.kernels as a neighbour: to a machine without Triton, to an early triton import, to the hardware.

Where the package's name and files come from (and that ``import kernels`` is never ours) is tested in
``tests/test_import_names.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effref import kernels

ROOT = Path(__file__).resolve().parents[2]
needs_cpu_triton = pytest.mark.skipif(not kernels.triton_available() or not kernels.INTERPRETED,
                                      reason="needs Triton and no GPU (the interpreter)")


WITHOUT_TRITON = r"""
import sys
from effref import kernels
assert "triton" not in sys.modules, "import effref.kernels must not import triton"
sys.modules["triton"] = sys.modules["triton.language"] = None  # as if the extra were not installed
import torch
from effref.kernels.rmsnorm import rmsnorm, rmsnorm_reference
from effref.kernels.bench import main

assert kernels.triton_available() is False
x, w = torch.ones(2, 8), torch.ones(8)
assert torch.allclose(rmsnorm_reference(x, w), x, atol=1e-5)
try:
    rmsnorm(x, w)
except ImportError as exc:
    print("launcher:", exc)
else:
    raise AssertionError("rmsnorm ran without triton")
assert main(["--check"]) == 1
print("describe:", kernels.describe())
"""


def test_package_imports_without_triton_and_names_the_extra():
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "EFFREF_TRITON_INTERPRET": ""}, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "launcher: the rmsnorm kernel needs Triton" in proc.stdout
    assert "pip install 'effref[triton]'" in proc.stdout
    assert "pip install 'effref[triton]'" in proc.stderr  # from the bench command


IMPORT_ORDER = r"""
import sys
import torch
if sys.argv[1] == "transformers-first":
    import transformers.models.llama.modeling_llama  # noqa: F401  pulls in triton, as load_model does
    import triton  # noqa: F401
import effref  # noqa: F401
from effref.kernels.rmsnorm import rmsnorm, rmsnorm_reference
x, w = torch.randn(3, 32), torch.randn(32)
try:
    torch.testing.assert_close(rmsnorm(x, w), rmsnorm_reference(x, w))
    print("kernel ok")
except RuntimeError as exc:
    print("refused:", exc)
"""


@needs_cpu_triton
@pytest.mark.parametrize("order", ["effref-first", "transformers-first"])
def test_import_order_with_triton_is_handled(order):
    # effref imports effref.kernels first, so a model loaded afterwards cannot spoil the interpreter; if triton
    # came first, the launcher refuses with the fix instead of Triton's "Cannot call @triton.jit'd outside ..."
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EFFREF_TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-c", IMPORT_ORDER, order], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    if order == "effref-first":
        assert "kernel ok" in proc.stdout
    else:
        assert "refused: the rmsnorm kernel would run under Triton's interpreter" in proc.stdout
        assert "import effref first" in proc.stdout


# --- the interpreter switch ---------------------------------------------------------------------------------

def _no_gpu() -> bool:
    return False


def _gpu() -> bool:
    return True


@pytest.mark.parametrize("environ, gpu, expected", [
    ({}, _no_gpu, True),  # rule 3: decide from the hardware
    ({}, _gpu, False),
    ({"TRITON_INTERPRET": "1"}, _gpu, True),  # rule 2: the caller's own TRITON_INTERPRET is respected
    ({"TRITON_INTERPRET": "0"}, _no_gpu, False),
    ({"EFFREF_TRITON_INTERPRET": "0", "TRITON_INTERPRET": "1"}, _no_gpu, False),  # rule 1 wins
    ({"EFFREF_TRITON_INTERPRET": "true"}, _gpu, True),
    ({"EFFREF_TRITON_INTERPRET": ""}, _gpu, False),  # empty means unset
])
def test_interpreter_switch_rules(environ, gpu, expected):
    interpreted, reason = kernels.resolve_interpret(environ, gpu)
    assert interpreted is expected and reason


@pytest.mark.parametrize("value", ["2", "maybe", "interpret"])
def test_bad_interpreter_override_is_refused(value):
    with pytest.raises(ValueError, match=rf"EFFREF_TRITON_INTERPRET='{value}' is not an on/off value"):
        kernels.resolve_interpret({"EFFREF_TRITON_INTERPRET": value}, _gpu)


def test_this_machine_got_a_consistent_switch():
    assert os.environ["TRITON_INTERPRET"] == ("1" if kernels.INTERPRETED else "0")
    if not torch.backends.cuda.is_built() and "EFFREF_TRITON_INTERPRET" not in os.environ:
        assert kernels.INTERPRETED  # a CPU-only torch: nothing to compile for


def test_gpu_question_goes_to_nvml_and_leaves_env_as_found(monkeypatch):
    # cuInit before fork() breaks CUDA in the children; NVML does not. Check that the question is asked with
    # PYTORCH_NVML_BASED_CUDA_CHECK=1 and that the caller's environment is restored afterwards.
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    def asked_through_nvml() -> bool:
        return os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1"

    monkeypatch.setattr(torch.cuda, "is_available", asked_through_nvml)
    assert kernels.cuda_gpu_present() is True
    assert "PYTORCH_NVML_BASED_CUDA_CHECK" not in os.environ
