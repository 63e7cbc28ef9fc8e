"""The coverage catalog stays honest: every implemented entry imports, is tested and is taught."""

from pathlib import Path

import pytest
import yaml

from effref.catalog import CATALOG_PATH, SECTION_TITLES, load_catalog, render_markdown, resolve

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = load_catalog()
IMPLEMENTED = [e for e in ENTRIES if e.implemented]


def _short_name(symbol: str) -> str:
    return symbol.rsplit(".", 1)[-1]


def test_catalog_covers_every_core_technique_once():
    ids = [e.id for e in ENTRIES]
    assert len(ids) == len(set(ids))
    assert len(ENTRIES) >= 120  # the taxonomy's core list; shrinking it silently would hide work
    assert {e.survey for e in ENTRIES} == set(SECTION_TITLES)


@pytest.mark.parametrize("entry", IMPLEMENTED, ids=lambda e: e.id)
def test_implemented_symbol_imports(entry):
    assert resolve(entry.symbol) is not None
    assert entry.kernel is None or (ROOT / entry.kernel).exists(), f"{entry.id}: no kernel file {entry.kernel}"


@pytest.mark.parametrize("entry", IMPLEMENTED, ids=lambda e: e.id)
def test_implemented_symbol_is_referenced_by_its_tests(entry):
    for test in entry.tests:
        source = (ROOT / test).read_text()
        assert _short_name(entry.symbol) in source, f"{test} never mentions {entry.symbol}"


@pytest.mark.parametrize("entry", IMPLEMENTED, ids=lambda e: e.id)
def test_implemented_symbol_appears_in_its_chapter(entry):
    chapter = ROOT / entry.chapter
    assert chapter.exists(), f"{entry.id}: chapter {entry.chapter} does not exist"
    assert _short_name(entry.symbol) in chapter.read_text(), f"{entry.chapter} never mentions {entry.symbol}"
    toc = (ROOT / "_toc.yml").read_text()
    assert Path(entry.chapter).with_suffix("").as_posix() in toc, f"{entry.chapter} is not in _toc.yml"


def test_coverage_page_is_current():
    page = (ROOT / "book" / "coverage.md").read_text()
    assert page == render_markdown(ENTRIES), "run: python -m effref.catalog --write book/coverage.md"


@pytest.mark.parametrize("bad, message", [
    ({"status": "done"}, "status='done'"),
    ({"survey": "9.9"}, "survey='9.9'"),
    ({"status": "implemented"}, "lacks a symbol"),
])
def test_bad_entries_are_rejected(tmp_path, bad, message):
    entry = dict(id="x", technique="X", survey="2.4", taxonomy="a/b", status="planned") | bad
    path = tmp_path / "catalog.yml"
    path.write_text(yaml.safe_dump([entry]))
    with pytest.raises(ValueError, match=message):
        load_catalog(path)


def test_repeated_ids_are_rejected(tmp_path):
    entry = dict(id="x", technique="X", survey="2.4", taxonomy="a/b", status="planned")
    path = tmp_path / "catalog.yml"
    path.write_text(yaml.safe_dump([entry, entry]))
    with pytest.raises(ValueError, match="repeat"):
        load_catalog(path)


def test_catalog_file_is_the_packaged_one():
    assert CATALOG_PATH.parent.name == "effref"
