"""Numbers in the chapters' prose come from the executed cells, and the chapters' asserts test something.

A measured number typed into prose goes stale the first time the experiment changes. So every decimal, percentage
or "n ×" in a chapter's text must be glued from a cell (MyST-NB ``{glue:text}``, which this scan does not see),
sit in a paragraph that attributes it to a paper, or be a setting or a format's arithmetic listed in ``SETTINGS``
below with the reason. And an ``assert`` whose condition reads no variable can never fail: it is refused.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import jupytext
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(p for p in (ROOT / "book").glob("*/*.md"))
NUMBER = re.compile(r"(?<![\w.$`{])(\d+(?:\.\d+)?\s?(?:%|×)|\d+(?:,\d{3})*\.\d+)(?![\w`])")
ATTRIBUTED = re.compile(r"\{cite|paper|report|Table|Fig|arXiv|et al\.|authors|survey|published", re.I)
HIDDEN = re.compile(r"\$\$.*?\$\$|\$[^$]*\$|`[^`]*`", re.S)  # math and code spans (glue roles are code spans)
SETTINGS = {  # (chapter, number): why it is not a measurement
    ("distillation", "0.8"): "the sampling temperature the cell uses",
    ("low_rank", "24 ×"): "the shape 576 = 24 × 24 of the folded embedding",
    ("pruning", "1 %"): "SparseGPT's damping setting",
    ("pruning", "50 %"): "the sparsity of the section",
    ("pruning", "1.125"): "2:4 storage arithmetic, asserted in its cell",
    ("pruning", "80 %"): "the sparsities of the sweep",
    ("quantization_activations", "0.53"): "W4A16 storage arithmetic (4 bits + group scales and zeros)",
    ("structured_pruning", "20 %"): "a pruning ratio the chapter sets",
    ("structured_pruning", "50 %"): "a pruning ratio the chapter sets",
    ("memory_efficient", "4.127"): "NF4 with double quantization: storage arithmetic, asserted in its cell",
    ("peft_lora", "80 %"): "the train / test split",
    ("peft_lora", "20 %"): "the train / test split",
    ("offloading_and_sparsity", "90%"): "the contribution thresholds that define the measurement",
    ("offloading_and_sparsity", "99%"): "the contribution thresholds that define the measurement",
    ("mixed_precision_optimizers", "4×"): "the batch size an exercise suggests",
}


def prose_numbers(chapter: Path) -> list[tuple[str, str]]:
    """(number, paragraph) for every unattributed decimal, percentage or "n ×" in the chapter's markdown."""
    found = []
    for cell in jupytext.read(chapter).cells:
        if cell.cell_type != "markdown":
            continue
        for paragraph in re.split(r"\n\s*\n", HIDDEN.sub(" ", cell.source)):
            if not ATTRIBUTED.search(paragraph):
                found += [(n, paragraph) for n in NUMBER.findall(paragraph)]
    return found


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_prose_numbers_are_glued_attributed_or_settings(chapter):
    typed = [(n, p[:120]) for n, p in prose_numbers(chapter) if (chapter.stem, n) not in SETTINGS]
    assert not typed, (f"{chapter.name}: numbers typed into prose — glue them from a cell ({{glue:text}}`name`), "
                       f"attribute them, or list a setting in SETTINGS: {typed}")


def test_the_scan_finds_a_typed_number():
    assert prose_numbers_in("Pruning raised perplexity from 277.5 to 925.1, about 3.3× worse.") == \
        ["277.5", "925.1", "3.3×"]
    assert prose_numbers_in("The paper reports 27.66.") == []  # attributed
    assert prose_numbers_in("We measured {glue:text}`ppl:.1f` and $0.5$.") == []  # glued, math


def prose_numbers_in(text: str) -> list[str]:
    tmp = Path(__file__).parent / "_scan_probe.md"
    try:
        tmp.write_text(text + "\n")
        return [n for n, _ in prose_numbers(tmp)]
    finally:
        tmp.unlink()


def constant_asserts(source: str) -> list[str]:
    """Asserts whose condition names no variable: true or false once and for all."""
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    def reads_a_variable(test: ast.expr) -> bool:  # a name that is not just the function being called
        called = {id(n.func) for n in ast.walk(test) if isinstance(n, ast.Call)}
        return any(isinstance(n, ast.Name) and id(n) not in called for n in ast.walk(test))

    return [ast.unparse(node.test) for node in ast.walk(tree)
            if isinstance(node, ast.Assert) and not reads_a_variable(node.test)]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_no_assert_on_constants(chapter):
    bad = [a for cell in jupytext.read(chapter).cells if cell.cell_type == "code" for a in constant_asserts(cell.source)]
    assert not bad, f"{chapter.name}: asserts that cannot fail: {bad}"


def test_the_constant_check_bites():
    assert constant_asserts("assert abs(9 / 3 - 3) < 1e-6\nassert x > 1") == ["abs(9 / 3 - 3) < 1e-06"]
