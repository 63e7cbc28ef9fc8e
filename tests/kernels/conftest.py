"""A fixture for kernel tests: compile a Triton kernel for a GPU on a machine that has none.

The interpreter accepts code a GPU compiler refuses (non-constexpr globals, tl.dot tiles under 16, some type
mixes), so a kernel tested only under the interpreter can still fail on its first GPU launch. Triton can
lower a kernel all the way to machine code (PTX, then ptxas) for a named target without a driver; this
fixture does that in a subprocess with the interpreter switched off, so the test process keeps its own mode.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import json, os, sys
os.environ["EFFREF_TRITON_INTERPRET"] = "0"  # before kernels is imported: @triton.jit builds JITFunctions
os.environ["TRITON_INTERPRET"] = "0"  # the parent test process may have set it to 1
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

for job in json.loads(sys.argv[1]):
    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    signature = {}
    for name in kernel.arg_names:  # pointers and scalars from the job, constexprs by name, other scalars i32
        if name in job["constexprs"]:
            signature[name] = "constexpr"
        else:
            signature[name] = job["types"].get(name, job["pointer"] if name.endswith("_ptr") else "i32")
    source = ASTSource(fn=kernel, signature=signature, constexprs=job["constexprs"])
    compiled = triton.compile(source, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
    print("compiled", job["kernel"], len(compiled.asm["cubin"]), "bytes of sm_%d code" % job["arch"])
"""


@pytest.fixture
def compile_for_gpu():
    """``compile_for_gpu(job, ...)`` compiles each job in one subprocess and returns the compiler's report.

    A job is ``dict(module=..., kernel=..., pointer="*bf16", types={}, constexprs={}, arch=90)``: ``pointer`` is
    the type of every ``*_ptr`` argument not named in ``types``; other scalars default to i32. Skips when
    Triton has no NVIDIA backend here; fails with the compiler's message otherwise.
    """
    pytest.importorskip("triton.backends.nvidia")

    def run(*jobs: dict) -> str:
        full = [{"pointer": "*bf16", "types": {}, "constexprs": {}, "arch": 90, "options": {"num_warps": 4}} | job
                for job in jobs]
        proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(full)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, check=False)
        assert proc.returncode == 0, f"a kernel does not compile for the GPU:\n{proc.stderr[-3000:]}"
        return proc.stdout

    return run
