"""The performance report reads the chapters' records and says what is missing, instead of failing."""

import json

import pytest

from effref import plotting
from effref.frameworks import report


def test_headlines_come_from_records_and_missing_ones_say_why(tmp_path, monkeypatch):
    monkeypatch.setenv(plotting.RECORDS_ENV, str(tmp_path))
    monkeypatch.setenv(plotting.CHAPTER_ENV, "book/compression/pruning.md")
    plotting.glue("alloc_ppl", 41.5)
    (tmp_path / "broken.json").write_text("{not json")  # a half-written or foreign file is skipped
    rows = {(r["chapter"], r["name"]): r for r in report.headline_rows()}
    assert rows[("book/compression/pruning.md", "alloc_ppl")]["value"] == 41.5
    assert rows[("book/compression/pruning.md", "uniform_ppl")]["status"].startswith("not recorded")
    assert rows[("book/architecture/moe.md", "moe_gain")]["status"] == "not run yet"
    monkeypatch.setattr(report, "HEADLINES", report.HEADLINES + (report.Headline("t", "l", "book/none/x.md", "x"),))
    rows = {(r["chapter"], r["name"]): r for r in report.headline_rows()}
    assert rows[("book/none/x.md", "x")]["status"] == "chapter not written yet"


def test_every_headline_names_a_chapter_of_the_book_or_one_still_to_come():
    for h in report.HEADLINES:
        assert h.chapter.startswith("book/") and h.chapter.endswith(".md") and h.name.isidentifier()


def test_kernel_results_are_read_from_files_only(tmp_path):
    assert report.kernel_results(tmp_path / "absent") == []
    (tmp_path / "h100.json").write_text(json.dumps({"device": "NVIDIA H100", "results": [{"kernel": "rmsnorm"}]}))
    [result] = report.kernel_results(tmp_path)
    assert result["device"] == "NVIDIA H100" and result["file"] == "h100.json"


def test_the_command_prints_every_headline(capsys, tmp_path):
    assert report.main(["--records", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(h.label[:40] in out for h in report.HEADLINES)
    assert "no GPU has run the bench yet" in out or "kernel GPU result files" in out


@pytest.mark.parametrize("value", [float("inf"), "text", True])
def test_only_finite_numbers_reach_the_records(tmp_path, monkeypatch, value):
    monkeypatch.setenv(plotting.RECORDS_ENV, str(tmp_path))
    monkeypatch.setenv(plotting.CHAPTER_ENV, "book/x/y.md")
    plotting.glue("v", value)
    assert report.load_records(tmp_path) == {}
