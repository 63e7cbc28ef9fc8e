"""The ``kernels`` package as a neighbour: to transformers, to a machine without Triton, to the hardware.

Our import name collides with Hugging Face's ``kernels`` (hub kernels), which transformers probes for with
``is_kernels_available()``. What that probe does, read from transformers 5.24 and measured here:

1. ``importlib.util.find_spec("kernels")`` finds *our* package (the editable install maps it, and the repo
   root is on ``sys.path``), so the package "exists".
2. It then wants a version. ``importlib.metadata.version("kernels")`` fails (no distribution has that name);
   ``packages_distributions()`` maps the import name ``kernels`` to the distribution ``effref`` (through
   ``top_level.txt``), whose version 0.1.0 is below the required ``>=0.18.2,<0.19``. Answer: False, and our
   module is never imported: transformers reads metadata only.
3. Only if no metadata is found at all (a checkout on ``sys.path`` that was never pip-installed) does it
   fall back to ``importlib.import_module("kernels")``. Then our package *is* imported, finds no
   ``__version__`` (we define none on purpose), and the answer is still False. The import is cheap and its
   only side effect is the interpreter switch, i.e. setting ``TRITON_INTERPRET``.

So a tiny ``LlamaForCausalLM`` built from a config gives bit-identical logits whether or not our package is
visible (compared against a fresh interpreter where ``sys.modules["kernels"] = None`` hides it). Each
scenario runs in its own subprocess, because the probe is cached per process and the question is what a
fresh ``import transformers`` does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels

ROOT = Path(__file__).resolve().parents[2]
needs_cpu_triton = pytest.mark.skipif(not kernels.triton_available() or not kernels.INTERPRETED,
                                      reason="needs Triton and no GPU (the interpreter)")

TRANSFORMERS_PROBE = r"""
import importlib.metadata as metadata
import importlib.util
import json
import sys

root, mode, out = sys.argv[1:4]
sys.path.insert(0, root)
if mode == "hidden":
    sys.modules["kernels"] = None  # find_spec answers None and import raises: as if we were not installed

spec = importlib.util.find_spec("kernels")
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import import_utils

report = {"spec_origin": getattr(spec, "origin", None), "available": import_utils.is_kernels_available()}
torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = LlamaForCausalLM(config).eval()
ids = (torch.arange(16) * 7 % 128)[None]  # (1, 16)
with torch.no_grad():
    logits = model(ids).logits  # (1, 16, 128)
torch.save(logits, out + ".pt")
report["ours_imported"] = sys.modules.get("kernels") is not None

if mode == "visible":  # scenario 3: no metadata anywhere, so transformers falls back to importing
    real_version = metadata.version
    def version(name):
        if name in ("kernels", "effref"):
            raise metadata.PackageNotFoundError(name)
        return real_version(name)
    metadata.version = version
    import_utils.is_kernels_available.cache_clear()
    report["no_metadata_available"] = import_utils.is_kernels_available()
    report["no_metadata_ours_imported"] = getattr(sys.modules.get("kernels"), "__file__", None)
with open(out + ".json", "w") as f:
    json.dump(report, f)
"""


def _hf_kernels_installed() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(_hf_kernels_installed(), reason="Hugging Face's own `kernels` distribution is installed")
def test_transformers_ignores_our_kernels_package(tmp_path):
    probe = [sys.executable, "-c", TRANSFORMERS_PROBE, str(ROOT)]
    procs = {  # both at once: each pays ~5-9 s for import transformers
        mode: subprocess.Popen([*probe, mode, str(tmp_path / mode)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for mode in ("visible", "hidden")
    }
    for mode, proc in procs.items():
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{mode} subprocess failed:\n{err[-3000:]}"
    visible = json.loads((tmp_path / "visible.json").read_text())
    hidden = json.loads((tmp_path / "hidden.json").read_text())

    assert visible["spec_origin"] == str(ROOT / "kernels" / "__init__.py")  # the probe really saw ours
    assert hidden["spec_origin"] is None
    assert visible["available"] is False and hidden["available"] is False
    assert visible["ours_imported"] is False  # building and running the model never touched our package
    torch.testing.assert_close(torch.load(tmp_path / "visible.pt"), torch.load(tmp_path / "hidden.pt"),
                               atol=0, rtol=0)
    # without any metadata, transformers imports our package and still declines it
    assert visible["no_metadata_available"] is False
    assert visible["no_metadata_ours_imported"] == str(ROOT / "kernels" / "__init__.py")


WITHOUT_TRITON = r"""
import sys
import kernels
assert "triton" not in sys.modules, "import kernels must not import triton"
sys.modules["triton"] = sys.modules["triton.language"] = None  # as if the extra were not installed
import torch
from kernels.rmsnorm import rmsnorm, rmsnorm_reference
from kernels.bench import main

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
from kernels.rmsnorm import rmsnorm, rmsnorm_reference
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
    # effref imports kernels first, so a model loaded afterwards cannot spoil the interpreter; if triton came
    # first, the launcher refuses with the fix instead of Triton's "Cannot call @triton.jit'd outside ..."
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EFFREF_TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-c", IMPORT_ORDER, order], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    if order == "effref-first":
        assert "kernel ok" in proc.stdout
    else:
        assert "refused: the rmsnorm kernel would run under Triton's interpreter" in proc.stdout
        assert "import effref (or kernels) first" in proc.stdout


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
