"""Run the book's chapters as tests, and show what each one costs.

Chapters are jupytext text notebooks (MyST markdown under ``book/``). nbval only collects ``.ipynb`` files, so
this hook hands nbval a notebook read by jupytext instead. Text notebooks store no outputs, so nbval has nothing
to compare: chapters guard their claims with ``assert`` in cells, and a raising cell fails the test. The paired
``.ipynb`` twins (for Colab) are skipped here, or every chapter would run twice.

When every cell of a chapter passes, its outputs are written into the book's execution cache
(``_build/.jupyter_cache``, the ``execute.cache`` of ``_config.yml``), so ``jupyter-book build`` renders the
figures and tables nbval just produced instead of executing the chapter a second time.

At the end of the session a table lists each chapter's wall time against its budget.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).parent
# OpenMP threads sleep instead of spinning while they wait: on a small shared machine spinning threads steal the
# cores the chapter kernels (subprocesses, which inherit this) need. Set before any test imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The chapters' stored outputs (nbval's run fills the book's cache) show results, not progress bars, which would
# render as stderr blocks; a reader running a chapter gets the bars (effref.runtime.progress_bar).
os.environ.setdefault("EFFREF_PROGRESS", "0")
CHAPTER_BUDGET_S = float(os.environ.get("EFFREF_CHAPTER_BUDGET_S", 180))
BOOK_CACHE = ROOT / "_build" / ".jupyter_cache"
collect_ignore_glob = ["book/**/*.ipynb", "book/_build/*", "_build/*"]


def is_chapter(path: Path) -> bool:
    """A chapter is a markdown file under book/ whose front matter declares a jupytext kernelspec."""
    if path.suffix != ".md" or "book" not in path.relative_to(ROOT).parts[:1]:
        return False
    head = path.read_text(encoding="utf-8")[:1500]
    return head.startswith("---") and "jupytext" in head and "kernelspec" in head


try:
    import nbval.plugin as nbval_plugin
except ImportError:  # chapters are only collected when nbval is installed (the `test` extra)
    nbval_plugin = None

if nbval_plugin is not None:

    class JupytextChapter(nbval_plugin.IPyNbFile):
        """nbval's notebook collector, fed by jupytext; hands the executed chapter to the book's cache."""

        def collect(self):
            read = nbval_plugin.nbformat.read
            nbval_plugin.nbformat.read = lambda path, as_version=4: jupytext.read(path)
            try:
                items = list(super().collect())
            finally:
                nbval_plugin.nbformat.read = read
            for item in items:
                item.add_marker(pytest.mark.chapter)
            self.cells_passed = 0
            self.cells_total = len(items)
            return items

        def teardown(self):
            super().teardown()
            if self.cells_total and self.cells_passed == self.cells_total:
                _cache_executed(self.path, self.nb)

    def pytest_collect_file(file_path: Path, parent):
        opt = parent.config.option
        if (opt.nbval or opt.nbval_lax) and is_chapter(file_path):
            return JupytextChapter.from_parent(parent, path=file_path)
        return None


def _as_output(out) -> nbformat.NotebookNode:
    fields = {k: v for k, v in out.items() if k != "output_type"}
    return nbformat.v4.new_output(out["output_type"], **fields)


def _cache_executed(path: Path, nb: nbformat.NotebookNode) -> None:
    """Store a fully executed chapter in jupyter-cache, keyed (as myst-nb keys it) on its code cells."""
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    count = 0
    for cell in nb.cells:
        if cell.cell_type == "code":
            count += 1
            cell.execution_count = count
            for out in cell.outputs:
                if out.output_type == "execute_result":
                    out.execution_count = count
    nbformat.validate(nb)
    cache = get_cache(BOOK_CACHE)
    cache.cache_notebook_bundle(CacheBundleIn(nb, uri=str(path)), check_validity=False, overwrite=True)


_chapter_seconds: dict[str, float] = defaultdict(float)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = time.perf_counter()
    yield
    if item.get_closest_marker("chapter"):
        _chapter_seconds[item.nodeid.split("::")[0]] += time.perf_counter() - start


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    outcome = yield
    if item.get_closest_marker("chapter") and outcome.excinfo is None:
        item.cell.outputs = [_as_output(out) for out in getattr(item, "test_outputs", [])]
        item.parent.cells_passed += 1


def pytest_terminal_summary(terminalreporter):
    if not _chapter_seconds:
        return
    tr = terminalreporter
    tr.section("chapter timings (budget %.0f s each on CPU)" % CHAPTER_BUDGET_S)
    for chapter, seconds in sorted(_chapter_seconds.items()):
        flag = "" if seconds <= CHAPTER_BUDGET_S else "  OVER BUDGET"
        tr.write_line(f"{seconds:8.1f} s  {chapter}{flag}")
    tr.write_line(f"{sum(_chapter_seconds.values()):8.1f} s  all chapters")
