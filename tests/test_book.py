"""The book's sources are consistent: table of contents, Colab twins, install cells, citations."""

import ast
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import jupytext
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())


def _toc_files(node) -> list[str]:
    files = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("file", "root"):
                files.append(value)
            else:
                files += _toc_files(value)
    elif isinstance(node, list):
        for value in node:
            files += _toc_files(value)
    return files


TOC_FILES = _toc_files(TOC)
NOTEBOOKS = [ROOT / f"{f}.md" for f in TOC_FILES if "kernelspec" in (ROOT / f"{f}.md").read_text()[:1500]]


def test_every_toc_entry_exists():
    missing = [f for f in TOC_FILES if not (ROOT / f"{f}.md").exists()]
    assert not missing, f"_toc.yml lists files that do not exist: {missing}"


def test_every_page_is_in_the_toc():
    pages = {p.relative_to(ROOT).with_suffix("").as_posix() for p in (ROOT / "book").rglob("*.md")
             if "_build" not in p.parts}
    assert pages == set(TOC_FILES), f"pages outside _toc.yml: {sorted(pages - set(TOC_FILES))}"


def test_there_are_notebook_chapters():
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("chapter", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_twin_is_in_sync_and_output_free(chapter):
    twin = chapter.with_suffix(".ipynb")
    assert twin.exists(), f"run: jupytext --sync {chapter.relative_to(ROOT)}"
    text_nb, ipynb = jupytext.read(chapter), jupytext.read(twin)
    cells = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]  # noqa: E731
    assert cells(text_nb) == cells(ipynb), f"{twin.name} is out of sync; run: jupytext --sync {chapter.name}"
    for cell in ipynb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{twin.name} stores outputs; clear them"


@pytest.mark.parametrize("chapter", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_source_has_no_tab(chapter):
    # a TAB in prose or math is almost always an escape gone wrong: "\t" of "\times" rendered "8 imes 8"
    lines = [n for n, line in enumerate(chapter.read_text().splitlines(), 1) if "\t" in line]
    assert not lines, f"TAB characters on lines {lines} of {chapter.name}"


@pytest.mark.parametrize("chapter", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_twin_asks_for_a_gpu_runtime(chapter):
    # without it Colab opens the chapter on a CPU runtime, i.e. at quick scale
    metadata = jupytext.read(chapter.with_suffix(".ipynb")).metadata
    assert metadata.get("accelerator") == "GPU" and metadata.get("colab", {}).get("gpuType")


@pytest.mark.parametrize("chapter", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_code_cell_installs_effref_only_on_colab(chapter):
    first = next(c for c in jupytext.read(chapter).cells if c.cell_type == "code")
    assert '"google.colab" in sys.modules' in first.source
    url = CONFIG["repository"]["url"]
    assert f"git+{url}" in first.source, f"the install cell must use the repository url of _config.yml ({url})"


@pytest.mark.parametrize("chapter", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_install_cell_keeps_the_preinstalled_torch(chapter):
    # Colab ships its own CUDA torch: the cell must pin exactly that build, or a dependency's range could make
    # pip download and install another. Expand the %pip line as IPython would, with a Colab-like torch.
    from IPython.core.inputtransformer2 import TransformerManager
    from IPython.core.interactiveshell import InteractiveShell

    first = next(c for c in jupytext.read(chapter).cells if c.cell_type == "code")
    python = TransformerManager().transform_cell(first.source)  # %pip -> get_ipython().run_line_magic(...)
    (magic,) = re.findall(r"run_line_magic\('pip', (.+)\)", python)
    torch = SimpleNamespace(__version__="2.9.0+cu126")  # noqa: F841  (read by var_expand from this frame)
    args = shlex.split(InteractiveShell.instance().var_expand(ast.literal_eval(magic)))
    assert args[0] == "install" and "torch==2.9.0+cu126" in args
    assert any(a.startswith("effref[hub,notebook] @ git+") for a in args)  # the hub model, plots and tables


def test_repository_url_is_a_github_url_for_the_launch_buttons():
    assert CONFIG["repository"]["url"].startswith("https://github.com/")
    assert CONFIG["launch_buttons"]["colab_url"] == "https://colab.research.google.com"


def test_every_citation_is_in_the_bibliography():
    bib = (ROOT / "book" / "references.bib").read_text()
    keys = set(re.findall(r"@\w+\{([^,]+),", bib))
    cited = set()
    for page in (ROOT / "book").rglob("*.md"):
        for group in re.findall(r"\{cite[pt]?\}`([^`]+)`", page.read_text()):
            cited |= {k.strip() for k in group.split(",")}
    assert cited, "no chapter cites anything"
    assert cited <= keys, f"cited but missing from references.bib: {sorted(cited - keys)}"


@pytest.mark.parametrize("chapter", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_glued_name_in_the_prose_is_glued_by_a_cell(chapter):
    """A {glue:text}`name` with no glue("name", …) fails only the book build, at the end of CI; catch it here.

    A name counts as glued when a code cell holds it as a string literal, or glues under a computed name that
    starts with a literal prefix of it (glue(f"ppl_{…}", …), glue("end_" + …, …))."""
    cells = jupytext.read(chapter).cells
    code = "\n".join(c.source for c in cells if c.cell_type == "code")
    prose = "\n".join(c.source for c in cells if c.cell_type == "markdown")
    literals = set(re.findall(r"""["']([A-Za-z_]\w*)["']""", code))
    prefixes = re.findall(r"""glue\(\s*f?["']([A-Za-z_]\w*?)(?:\{|["']\s*\+)""", code)
    used = set(re.findall(r"\{glue(?::\w+)?\}`([A-Za-z_]\w*)", prose))
    missing = sorted(name for name in used if name not in literals and not any(name.startswith(p) for p in prefixes))
    assert not missing, f"{chapter.name}: the prose shows glued names no cell glues: {missing}"
