"""Tests for effref.plotting: exact number formats, figures that render with their caption, a stable style."""

from __future__ import annotations

import io
import json
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import pandas as pd
import pytest

from effref.plotting import (
    OKABE_ITO,
    human_bytes,
    human_count,
    new_figure,
    provenance_note,
    results_table,
    use_style,
)


@pytest.fixture(autouse=True)
def restore_rcparams():
    with matplotlib.rc_context():
        yield
    plt.close("all")


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (512, "512 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (1_258_291, "1.2 MiB"), (1_048_575, "1.0 MiB"),  # 1023.999 KiB rounds up into the next unit
    (5 * 2**30, "5.0 GiB"), (3 * 2**40 + 2**39, "3.5 TiB"), (-2048, "-2.0 KiB"), (1536.0, "1.5 KiB"),
])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize("n, text", [
    (0, "0"), (999, "999"), (1000, "1.0 K"), (134_515_008, "134.5 M"), (999_950, "1.0 M"),
    (7_241_732_096, "7.2 B"), (1.5e12, "1.5 T"), (-12_500, "-12.5 K"),
])
def test_human_count(n, text):
    assert human_count(n) == text


@pytest.mark.parametrize("helper", [human_bytes, human_count])
@pytest.mark.parametrize("bad", ["12", None, True, math.nan, math.inf])
def test_number_helpers_reject_non_numbers(helper, bad):
    with pytest.raises(ValueError, match=r"n=.* is not a finite number"):
        helper(bad)


def png_shape(fig) -> tuple[int, int]:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = buffer.getvalue()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(io.BytesIO(data)).shape[:2]


def test_figure_with_provenance_renders_and_keeps_its_caption():
    fig, ax = new_figure()
    ax.plot([1, 2, 3], [3, 1, 2], label="ppl")
    ax.set_xlabel("bits")
    height_without, _ = png_shape(fig)
    caption = "tiny random Llama · 41 random tokens · cpu · quick scale"
    note = provenance_note(ax, caption)
    height_with, _ = png_shape(fig)
    assert caption in [t.get_text() for t in fig.texts]
    assert note.get_window_extent().y1 < ax.get_window_extent().y0  # below the axes
    assert height_with > height_without  # the saved image grew to include the caption


def test_provenance_is_replaced_not_stacked_and_works_on_panel_arrays():
    fig, axes = new_figure(ncols=3)
    assert axes.shape == (3,)
    provenance_note(axes, "first")
    provenance_note(fig, "second")
    assert [t.get_text() for t in fig.texts] == ["second"]


@pytest.mark.parametrize("target, text, error, match", [
    ("fig", "", ValueError, r"text='' is empty"),
    ("fig", "   ", ValueError, r"text='   ' is empty"),
    ("fig", None, ValueError, r"text=None is empty"),
    ("a string", "note", TypeError, r"Figure or Axes, got str"),
])
def test_provenance_rejects_bad_arguments(target, text, error, match):
    fig, _ = new_figure()
    with pytest.raises(error, match=match):
        provenance_note(fig if target == "fig" else target, text)


def test_use_style_is_idempotent_and_colour_blind_safe():
    use_style()
    first = dict(matplotlib.rcParams)
    use_style()
    assert dict(matplotlib.rcParams) == first
    colours = [c["color"] for c in matplotlib.rcParams["axes.prop_cycle"]]
    assert colours == OKABE_ITO and len(set(colours)) == 8
    assert matplotlib.rcParams["axes.grid"] and matplotlib.rcParams["figure.dpi"] == 110


def test_new_figure_sizes_panels():
    fig, axes = new_figure(ncols=2, nrows=2)
    assert axes.shape == (2, 2)
    assert tuple(fig.get_size_inches()) == pytest.approx((9.6, 6.8))
    with pytest.raises(ValueError, match=r"ncols=0, nrows=1: .*at least one panel"):
        new_figure(ncols=0)


def test_results_table_sorts_rounds_and_stays_a_dataframe():
    rows = [
        {"method": "rtn", "bits": 4, "ppl": 36.61234, "size_mb": 81.2345},
        {"method": "fp32", "bits": 32, "ppl": 29.93012, "size_mb": 538.1},
        {"method": "gptq", "bits": 3, "ppl": 124.6189},  # size missing
    ]
    table = results_table(rows, columns=["method", "ppl", "bits", "size_mb"], sort_by="bits")
    assert isinstance(table, pd.DataFrame)
    assert list(table.columns) == ["method", "ppl", "bits", "size_mb"]
    assert list(table["method"]) == ["gptq", "rtn", "fp32"]  # sorted by bits, ascending
    assert list(table["ppl"]) == [124.6, 36.6, 29.9]  # 4 significant digits of 124.6 → 1 decimal
    assert list(table["bits"]) == [3, 4, 32]  # integers untouched
    assert math.isnan(table["size_mb"][0]) and list(table["size_mb"][1:]) == [81.2, 538.1]
    by_ppl = results_table(rows, sort_by="ppl", ascending=False)
    assert list(by_ppl["method"]) == ["gptq", "rtn", "fp32"]
    assert list(by_ppl.columns) == ["method", "bits", "ppl", "size_mb"]  # order of first appearance


@pytest.mark.parametrize("rows, kwargs, match", [
    ([], {}, r"rows must be a non-empty list of dicts"),
    ({"ppl": 1.0}, {}, r"rows must be a non-empty list of dicts"),
    ([{"ppl": 1.0}, 3], {}, r"rows\[1\] is a int, not a dict"),
    ([{"ppl": 1.0}], {"columns": ["ppl", "bits"]}, r"columns \['bits'\] appear in no row; available: \['pp"),
    ([{"ppl": 1.0}], {"sort_by": "bits"}, r"sort_by='bits': \['bits'\] not among the columns"),
    ([{"ppl": 1.0}], {"digits": 0}, r"digits=0 must be >= 1"),
])
def test_results_table_rejects_bad_arguments(rows, kwargs, match):
    with pytest.raises(ValueError, match=match):
        results_table(rows, **kwargs)


# ------------------------------------------------------------------------------------------------ records


def test_glue_records_the_value_under_the_chapter_that_mentions_its_name(tmp_path, monkeypatch):
    from effref import plotting

    book = tmp_path / "book"
    (book / "part").mkdir(parents=True)
    (book / "part" / "one.md").write_text('glue("speed_up", x) and {glue:text}`speed_up:.2f`')
    (book / "part" / "two.md").write_text("nothing glued here")
    monkeypatch.setattr(plotting, "_BOOK", book)
    monkeypatch.setenv(plotting.RECORDS_ENV, str(tmp_path / "records"))
    monkeypatch.delenv(plotting.CHAPTER_ENV, raising=False)
    monkeypatch.chdir(book / "part")
    assert plotting.glue("speed_up", 2.5) == 2.5
    assert plotting.glue("speed_up", 3) == 3  # the latest run wins
    plotting.glue("not_in_any_chapter", 1.0)  # no chapter names it: not recorded
    data = json.loads((tmp_path / "records" / "part__one.json").read_text())
    assert data["chapter"] == "book/part/one.md"
    assert data["values"]["speed_up"]["value"] == 3.0
    assert set(data["values"]) == {"speed_up"}


def test_glue_records_nothing_outside_the_book_and_honours_an_explicit_chapter(tmp_path, monkeypatch):
    from effref import plotting

    monkeypatch.setenv(plotting.RECORDS_ENV, str(tmp_path / "records"))
    monkeypatch.delenv(plotting.CHAPTER_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    plotting.glue("x", 1.0)
    assert not (tmp_path / "records").exists()
    monkeypatch.setenv(plotting.CHAPTER_ENV, "book/inference/serving.md")
    plotting.glue("x", float("nan"))  # not a finite number: never recorded
    assert not (tmp_path / "records").exists()
    plotting.glue("x", 4.0)
    assert json.loads((tmp_path / "records" / "inference__serving.json").read_text())["values"]["x"]["value"] == 4.0
    assert plotting.record("label", True) is None  # a bool is not a measurement
