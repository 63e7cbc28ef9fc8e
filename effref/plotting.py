"""One look for every figure and table of the book, and the helpers that print numbers for people.

Protocol: a chapter calls ``new_figure`` (which applies ``use_style``), draws, and finishes every figure with
``provenance_note`` — a small grey caption under the axes that says which model, which data, which device and
which scale produced it, so a figure copied out of the book still says where it came from. Tables go through
``results_table``, which keeps a plain ``pandas.DataFrame`` (notebooks render it as HTML) with floats rounded
to a readable number of significant digits.

The palette is Okabe & Ito's (2008) colour-blind-safe set, ordered so that the first colours also differ in
lightness. The caption sits just below the figure's lower edge; ``use_style`` sets ``savefig.bbox = "tight"``
(Jupyter's inline backend does the same) so that saved and displayed figures include it.

Glossary: KiB/MiB/GiB binary units (1024) for bytes · K/M/B/T decimal units (1000) for counts.
Left out: interactive plots and LaTeX rendering (mathtext covers the book's labels).
"""

from __future__ import annotations

import datetime
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from cycler import cycler
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.text import Text

OKABE_ITO = ["#0072B2", "#D55E00", "#009E73", "#E69F00", "#56B4E9", "#CC79A7", "#000000", "#F0E442"]
PROVENANCE_GID = "effref-provenance"  # tags the caption so a second call replaces it

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 110,
    "savefig.bbox": "tight",  # keeps the provenance caption below the axes in saved files
    "figure.constrained_layout.use": True,
    "figure.facecolor": "white",
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linestyle": "-",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": cycler(color=OKABE_ITO),
    "lines.linewidth": 1.8,
    "lines.markersize": 5,
    "image.cmap": "viridis",  # perceptually uniform and colour-blind-safe
}


def use_style() -> None:
    """Apply the book's matplotlib settings (idempotent: the same values every call)."""
    mpl.rcParams.update(STYLE)


def new_figure(ncols: int = 1, nrows: int = 1, width: float | None = None, height: float | None = None,
               **subplots_kw) -> tuple[Figure, Axes | np.ndarray]:
    """A styled figure with ``nrows × ncols`` panels (4.8 × 3.4 inches each unless ``width``/``height``).

    Returns ``(fig, axes)`` like ``plt.subplots``: one Axes for a single panel, else an array of them.
    """
    if ncols < 1 or nrows < 1:
        raise ValueError(f"ncols={ncols}, nrows={nrows}: a figure needs at least one panel (use 1)")
    use_style()
    figsize = (width or 4.8 * ncols, height or 3.4 * nrows)
    return plt.subplots(nrows, ncols, figsize=figsize, **subplots_kw)


def provenance_note(ax_or_fig: Figure | Axes | np.ndarray, text: str) -> Text:
    """Put ``text`` as a small grey caption under the figure (replacing an earlier one); return it.

    Say where the numbers come from, e.g. "SmolLM2-135M (Q4_1 GGUF) · Emma, 8 × 512 tokens · cpu · quick".
    """
    if isinstance(ax_or_fig, np.ndarray) and ax_or_fig.size:
        ax_or_fig = ax_or_fig.flat[0]
    if isinstance(ax_or_fig, Figure):
        fig = ax_or_fig
    elif isinstance(ax_or_fig, Axes):
        fig = ax_or_fig.figure
    else:
        raise TypeError(f"ax_or_fig must be a matplotlib Figure or Axes, got {type(ax_or_fig).__name__}; "
                        "pass the fig or an axes from new_figure()")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text={text!r} is empty; say which model, data, device and scale made the figure")
    for old in [t for t in fig.texts if t.get_gid() == PROVENANCE_GID]:
        old.remove()
    return fig.text(0.01, -0.01, text, ha="left", va="top", fontsize=7.5, color="0.45", wrap=True,
                    gid=PROVENANCE_GID)


# ------------------------------------------------------------------------------------------------ tables


def _decimals_for(column: pd.Series, digits: int) -> int:
    """Decimals that give the column's largest finite magnitude ``digits`` significant digits (at least 0)."""
    finite = column[np.isfinite(column)].abs()
    if finite.empty or finite.max() == 0:
        return digits - 1
    return max(0, digits - 1 - math.floor(math.log10(finite.max())))


def results_table(rows: Sequence[Mapping], columns: list[str] | None = None,
                  sort_by: str | list[str] | None = None, ascending: bool = True,
                  digits: int = 4) -> pd.DataFrame:
    """A DataFrame of ``rows`` (one dict per result), float columns rounded for display.

    Each float column keeps ``digits`` significant digits of its largest value, with the same decimals on
    every row (36.61 and 29.93, not 36.6123 and 29.9), so much smaller values in the same column may read 0.

    ``columns`` picks and orders columns (default: keys in order of first appearance); ``sort_by`` sorts
    (stable) on the unrounded values. Missing entries are NaN.
    """
    if isinstance(rows, Mapping) or not isinstance(rows, Sequence) or not rows:
        raise ValueError(f"rows must be a non-empty list of dicts (one per result), got {rows!r:.60}")
    bad = [i for i, row in enumerate(rows) if not isinstance(row, Mapping)]
    if bad:
        raise ValueError(f"rows[{bad[0]}] is a {type(rows[bad[0]]).__name__}, not a dict; pass one dict per "
                         "result")
    if digits < 1:
        raise ValueError(f"digits={digits} must be >= 1 (significant digits kept)")
    known = list(dict.fromkeys(key for row in rows for key in row))
    columns = known if columns is None else list(columns)
    missing = [c for c in columns if c not in known]
    if missing:
        raise ValueError(f"columns {missing} appear in no row; available: {known}")
    keys = [sort_by] if isinstance(sort_by, str) else list(sort_by or [])
    unknown = [k for k in keys if k not in columns]
    if unknown:
        raise ValueError(f"sort_by={sort_by!r}: {unknown} not among the columns {columns}")

    table = pd.DataFrame(list(rows), columns=columns)
    if keys:
        table = table.sort_values(keys, ascending=ascending, kind="stable").reset_index(drop=True)
    for column in table.columns:
        if pd.api.types.is_float_dtype(table[column]):
            table[column] = table[column].round(_decimals_for(table[column], digits))
    return table


# ------------------------------------------------------------------------------------------------ numbers


def _check_number(name: str, n) -> float:
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or not math.isfinite(n):
        raise ValueError(f"{name}={n!r} is not a finite number; pass an int such as 1_048_576")
    return float(n)


def _human(n: float, base: int, units: list[str]) -> str:
    sign, value = ("-" if n < 0 else ""), abs(n)
    if round(value) < base:
        return f"{sign}{round(value)}{units[0]}"
    for unit in units[1:]:
        value /= base
        if round(value, 1) < base or unit == units[-1]:
            return f"{sign}{value:.1f} {unit}"
    raise AssertionError("unreachable")


def human_bytes(n: float) -> str:
    """Bytes in binary units with one decimal: 1258291 → "1.2 MiB"; below 1 KiB, whole bytes ("512 B")."""
    return _human(_check_number("n", n), 1024, [" B", "KiB", "MiB", "GiB", "TiB", "PiB"])


def human_count(n: float) -> str:
    """A count in decimal units with one decimal: 134_515_008 → "134.5 M"; below 1000, the integer."""
    return _human(_check_number("n", n), 1000, ["", "K", "M", "B", "T"])


RECORDS_ENV = "EFFREF_RECORDS_DIR"  # where chapters' records go; default: <repository>/_build/records
CHAPTER_ENV = "EFFREF_CHAPTER"  # the running chapter, e.g. book/inference/serving.md; default: found from the name
_BOOK = Path(__file__).resolve().parent.parent / "book"


def records_dir() -> Path:
    """The folder of the chapters' JSON records (``$EFFREF_RECORDS_DIR``, else ``_build/records`` of the
    repository)."""
    return Path(os.environ.get(RECORDS_ENV) or _BOOK.parent / "_build" / "records")


def _running_chapter(name: str) -> Path | None:
    """The chapter that glues ``name``: ``$EFFREF_CHAPTER`` if set; else, when the working folder is a part of
    the book (nbval and Jupyter Book run a chapter in its own folder), the one chapter there whose source
    mentions ``name`` in quotes or backticks. None when neither says (a script, a test, an ambiguous name)."""
    if os.environ.get(CHAPTER_ENV):
        return Path(os.environ[CHAPTER_ENV])
    cwd = Path.cwd().resolve()
    if cwd.parent != _BOOK and cwd != _BOOK:
        return None
    found = [p for p in sorted(cwd.glob("*.md")) if any(f"{q}{name}{e}" in p.read_text(encoding="utf-8")
                                                        for q, e in (('"', '"'), ("`", ":"), ("`", "`")))]
    return found[0].relative_to(_BOOK.parent) if len(found) == 1 else None


def record(name: str, value, chapter: str | Path | None = None) -> Path | None:
    """Add ``name = value`` to the chapter's record, ``<records_dir()>/<part>__<chapter>.json`` (one JSON object
    ``{"chapter": ..., "values": {name: {"value": ..., "at": ISO time}}}``); return its path, or None when the
    chapter is unknown (see ``_running_chapter``) or ``value`` is not a JSON number or string."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        return None
    chapter = Path(chapter) if chapter is not None else _running_chapter(name)
    if chapter is None:
        return None
    path = records_dir() / ("__".join(chapter.with_suffix("").parts[-2:]) + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {"chapter": chapter.as_posix(), "values": {}}
    data["values"][name] = {"value": float(value) if isinstance(value, numbers.Real) else value,
                            "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps(data, indent=1, sort_keys=True))
    scratch.replace(path)  # atomic: a reader never sees half a file
    return path


def glue(name: str, value):
    """Hand a computed number to the rendered book's prose and return it: MyST-NB's ``{glue:text}`name:.1f```
    shows it, formatted by the spec after the colon. Without MyST-NB (Colab, plain Jupyter) it only returns it.

    When a chapter of the book runs, the value is also written to that chapter's record (``record``), which the
    performance report reads: the book's headline numbers are gathered without copying any by hand."""
    value = value.item() if hasattr(value, "item") else value  # a torch or numpy scalar → a Python number
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        record(name, value)
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return value
    myst_glue(name, value, display=False)
    return value
