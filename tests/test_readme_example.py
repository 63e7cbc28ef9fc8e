"""The README's "use effref in your own code" example runs exactly as written."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_runs(tmp_path):
    readme = ROOT / "README.md"
    section = readme.read_text().split("## Use effref in your own code", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GPTQ 4-bit: relative logit error" in proc.stdout and "sparsity: 0.5" in proc.stdout
