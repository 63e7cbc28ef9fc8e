"""Our Triton kernels are ``effref.kernels``; ``import kernels`` belongs to Hugging Face, from every folder.

transformers 5.25 depends on Hugging Face's ``kernels`` distribution and imports it (``from kernels import
CUDAProperties, ...``) as soon as a model class loads. A package of ours answering ``import kernels`` breaks
that, and Hugging Face's package answering ``from kernels import w4a16`` breaks us. So the repository's
``kernels/`` folder has no ``__init__.py`` and is reached only through ``effref.kernels``.

Each check runs in a fresh interpreter, the way a reader starts one: from the repository root (setup.sh's
asset fetch, the bench command), from a chapter's folder (a notebook kernel), and from a wheel installed into
a scratch virtual environment, where nothing of the checkout is visible.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from effref import kernels

ROOT = Path(__file__).resolve().parents[1]
CHAPTER_FOLDER = ROOT / "book" / "inference"


def hf_kernels_init() -> Path | None:
    """Where Hugging Face's ``kernels/__init__.py`` is installed, or None when that distribution is absent."""
    try:
        return Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    except importlib.metadata.PackageNotFoundError:
        return None


# Run in a fresh interpreter: everything a reader does first, and where each name came from.
PROBE = r"""
import importlib.util, json, sys
import torch
import effref
from effref.kernels import rmsnorm as ours
from transformers import LlamaConfig, LlamaForCausalLM

config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
model = LlamaForCausalLM(config).eval()  # transformers >= 5.25 has imported Hugging Face's kernels by now
logits = model(torch.arange(8)[None]).logits  # (1, 8, 64)
device = "cpu" if effref.kernels.INTERPRETED else "cuda"
x, w = torch.randn(4, 32, device=device), torch.randn(32, device=device)
error = (ours.rmsnorm(x, w) - ours.rmsnorm_reference(x, w)).abs().max().item()  # our Triton kernel

spec = importlib.util.find_spec("kernels")
print(json.dumps({
    "effref": effref.__file__, "kernel_module": ours.__file__, "kernels_path": list(effref.kernels.__path__),
    "interpreted": effref.kernels.INTERPRETED, "kernel_error": error,
    "logits_finite": bool(logits.isfinite().all()),
    "hf_kernels": None if spec is None else spec.origin,
    "hf_kernels_loaded_by_transformers": getattr(sys.modules.get("kernels"), "__file__", None),
}))
"""


def run_probe(python: str, cwd: Path, env: dict | None = None) -> dict:
    env = {k: v for k, v in (env or os.environ).items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    proc = subprocess.run([python, "-c", PROBE], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=env, check=False)
    assert proc.returncode == 0, f"the probe failed from {cwd}:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_names(report: dict, kernels_folder: Path) -> None:
    """What every starting point must show: our kernels ran as effref.kernels, and kernels is not ours."""
    assert Path(report["kernel_module"]).parent == kernels_folder
    assert report["logits_finite"]
    assert report["kernel_error"] < 1e-2
    hf_init = hf_kernels_init()
    if hf_init is None:  # an older transformers, without Hugging Face's package: no top-level kernels at all
        assert report["hf_kernels"] is None or not Path(report["hf_kernels"]).is_relative_to(ROOT)
    else:
        assert Path(report["hf_kernels"]).resolve() == hf_init
        if report["hf_kernels_loaded_by_transformers"]:
            assert Path(report["hf_kernels_loaded_by_transformers"]).resolve() == hf_init


@pytest.mark.parametrize("cwd", [ROOT, CHAPTER_FOLDER], ids=["repository-root", "chapter-folder"])
def test_checkout_kernels_are_effref_kernels_and_kernels_is_hugging_faces(cwd):
    report = run_probe(sys.executable, cwd)
    check_names(report, ROOT / "kernels")
    assert Path(report["effref"]).is_relative_to(ROOT)


def test_no_import_name_of_ours_is_kernels():
    # the folder is not a package (an __init__.py there is what broke transformers 5.25), and the package
    # metadata names no top-level kernels: the wheel's contents are checked in the test below
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert kernels.KERNELS_DIR == ROOT / "kernels"
    assert [Path(p) for p in kernels.__path__] == [ROOT / "effref" / "kernels", ROOT / "kernels"]
    top_level = importlib.metadata.distribution("effref").read_text("top_level.txt") or "effref"
    assert top_level.split() == ["effref"]


def test_hugging_faces_kernels_is_installed_with_a_transformers_that_needs_it():
    # the situation this file guards against exists in the locked environment: if it ever stops existing,
    # the probes above would pass for the wrong reason
    transformers = tuple(int(p) for p in importlib.metadata.version("transformers").split(".")[:2])
    if transformers < (5, 25):
        pytest.skip("transformers < 5.25 does not need Hugging Face's kernels")
    assert hf_kernels_init() is not None and hf_kernels_init().is_file()


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """effref built as a wheel (no editable mode) and installed into a scratch venv that sees this venv's
    dependencies but nothing of the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # what an sdist holds: a copy keeps the build's build/ folder out of the checkout
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("effref", "kernels"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                            "--no-build-isolation", "--wheel-dir", str(tmp / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("effref-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True,
                   timeout=120)
    python = tmp / "venv" / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies (torch, transformers, triton, Hugging Face's kernels) come from this venv, after the
    # scratch venv's own site-packages; .pth files there are not run, so our editable finder stays out
    Path(purelib, "effref_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                              "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=300, check=False)
    assert install.returncode == 0, install.stderr[-3000:]
    return wheel, python, Path(purelib), tmp


def test_wheel_ships_the_kernels_inside_effref_only(wheel_venv):
    wheel, _, _, _ = wheel_venv
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"effref"}
    for module in ("__init__.py", "_runtime.py", "bench.py", "w4a16.py", "paged_attention.py"):
        assert f"effref/kernels/{module}" in names
    shipped = {name.removeprefix("effref/kernels/") for name in names if name.startswith("effref/kernels/")}
    assert {p.name for p in (ROOT / "kernels").glob("*.py")} <= shipped


def test_wheel_installed_kernels_import_and_run(wheel_venv, tmp_path):
    _, python, purelib, _ = wheel_venv
    report = run_probe(str(python), tmp_path)
    assert Path(report["effref"]).is_relative_to(purelib)
    assert report["kernels_path"] == [str(purelib / "effref" / "kernels")]  # no checkout folder joined in
    check_names(report, purelib / "effref" / "kernels")
