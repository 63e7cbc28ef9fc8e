"""The rendered book, as a reader's browser shows it (headless Chromium on the built HTML).

Needs the built book (`bash setup.sh`, or `jupyter-book build .`); skipped with a reason when it is missing,
unless EFFREF_REQUIRE_BOOK=1 (CI) makes that a failure. The pages load MathJax from a CDN; offline, the test
swaps in a local MathJax 3 (npm package `mathjax`, found via EFFREF_MATHJAX_DIR or .ci-home/npm) so that it checks
typeset math, not just TeX source.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("EFFREF_REQUIRE_BOOK") == "1"
MATHJAX_CDN = re.compile(r'src="https://cdn\.jsdelivr\.net/npm/mathjax@3/es5/tex-(?:mml-)?chtml\.js"')


def _need(condition: bool, reason: str) -> None:
    if not condition:
        pytest.fail(reason) if REQUIRED else pytest.skip(reason)


def _mathjax_dir() -> Path | None:
    for candidate in (os.environ.get("EFFREF_MATHJAX_DIR"), ROOT / ".ci-home/npm/node_modules/mathjax"):
        if candidate and (Path(candidate) / "es5" / "tex-chtml.js").exists():
            return Path(candidate)
    return None


def render(page: Path, tmp_path: Path) -> str:
    """The DOM of `page` after its scripts ran, with MathJax served from disk when we have a copy."""
    html = page.read_text()
    mathjax = _mathjax_dir()
    if mathjax is not None:
        html = MATHJAX_CDN.sub(f'src="file://{mathjax}/es5/tex-chtml.js"', html)
    local = page.with_name(f".{page.stem}-offline.html")  # beside the original, so relative links still work
    local.write_text(html)
    try:
        result = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--allow-file-access-from-files",
             f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=15000", "--dump-dom",
             local.as_uri()],
            capture_output=True, text=True, timeout=120)
    finally:
        local.unlink()
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module", autouse=True)
def built_book():
    _need(HTML.joinpath("index.html").exists(), "the book is not built: run `bash setup.sh`")
    _need(CHROMIUM is not None, "headless Chromium is missing: apt-get install chromium")


def test_lab_bench_page_shows_figure_math_and_colab_button(tmp_path):
    page = HTML / "book" / "foundations" / "lab_bench.html"
    dom = render(page, tmp_path)
    images = re.findall(r'<img[^>]+src="([^"]+\.png)"', dom)
    assert images, "the chapter shows no figure"
    assert all((page.parent / src).exists() for src in images), "a figure's image file is missing"
    assert re.search(r'href="https://colab\.research\.google\.com/github/[^"]+/lab_bench\.ipynb"', dom)
    assert 'class="math' in dom, "no math on the page"
    if _mathjax_dir() is not None or REQUIRED:
        assert "<mjx-container" in dom, "math was not typeset (MathJax did not run)"


def test_coverage_page_shows_its_table(tmp_path):
    dom = render(HTML / "book" / "coverage.html", tmp_path)
    assert dom.count("<table") >= 10
    assert "effref.models.llama.Attention" in dom and "implemented" in dom


def chapter_pages() -> list[Path]:
    return sorted(p for p in (HTML / "book").rglob("*.html") if not p.name.startswith("."))


# What a reader should never see in a chapter's outputs: the return value of a call made for its side effect
# (a caption's Text, a gc.collect() count, a list of Line2D, the number or text glue() returns), printed as a
# cell's result.
STRAY_RESULT = re.compile(r"^\s*(-?\d+(\.\d*)?(e[-+]?\d+)?|&#39;.*&#39;|'.*'|None|Text\(.*\)"
                          r"|\[?<matplotlib\.[^>]*>\]?|<Figure size [^>]*>)\s*$", re.S)  # a cell's leftover value


def test_chapters_show_no_stderr_no_stray_results_and_no_broken_math():
    pages = chapter_pages()
    assert len(pages) >= 17
    problems = []
    for page in pages:
        html = page.read_text()
        name = page.relative_to(HTML)
        problems += [f"{name}: a stderr block" for _ in re.findall(r'class="output stderr', html)]
        results = re.findall(r'class="output text_plain[^"]*"><div class="highlight"><pre><span></span>(.*?)</pre>',
                             html, re.S)
        for text in results:
            if STRAY_RESULT.match(text):
                problems.append(f"{name}: a stray result {text.strip()[:60]!r}")
        problems += [f"{name}: broken TeX ({m!r}: a TAB where a backslash-t was meant)"
                     for m in re.findall(r".{0,10}\simes\b.{0,10}", html)]
    assert not problems, "\n".join(problems)
