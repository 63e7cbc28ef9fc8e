"""The coverage catalog: which survey technique lives where in effref.

``catalog.yml`` (beside this file) lists every core technique of the survey's taxonomy with its survey section,
citation and status. An implemented entry names the symbol that implements it, the tests that check it and the
chapter that measures it; a planned one names the issue that will deliver it. This module loads and validates
the file and renders it as the book's Coverage page::

    python -m effref.catalog --write book/coverage.md    # regenerate the page (a test checks it is current)
"""

from __future__ import annotations

import argparse
import importlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CATALOG_PATH = Path(__file__).with_name("catalog.yml")
STATUSES = ("implemented", "planned")

# Survey section → the heading it gets on the Coverage page (the survey's own structure, §2–§4).
SECTION_TITLES = {
    "2.1.1": "Quantization", "2.1.2": "Parameter pruning", "2.1.3": "Low-rank approximation",
    "2.1.4": "Knowledge distillation", "2.2": "Efficient pre-training",
    "2.3.1": "Parameter-efficient fine-tuning", "2.3.2": "Memory-efficient fine-tuning",
    "2.4": "Efficient inference", "2.5.1": "Efficient attention", "2.5.2": "Mixture of experts",
    "2.5.3": "Long-context LLMs", "2.5.4": "Transformer alternatives", "3.1": "Data selection",
    "3.2.1": "Few-shot prompting", "3.2.2": "Prompt compression and generation",
    "4": "LLM frameworks",
}


@dataclass(frozen=True)
class Entry:
    """One survey technique and where effref implements, tests and teaches it."""

    id: str
    technique: str
    survey: str
    taxonomy: str
    status: str
    citation: str = ""
    symbol: str | None = None
    usage: str | None = None
    tests: tuple[str, ...] = field(default_factory=tuple)
    chapter: str | None = None
    kernel: str | None = None
    issue: int | None = None

    @property
    def implemented(self) -> bool:
        return self.status == "implemented"


def load_catalog(path: Path = CATALOG_PATH) -> list[Entry]:
    """Read and validate the catalog; raises ValueError naming the entry and the field at fault."""
    entries = []
    for raw in yaml.safe_load(path.read_text()):
        raw = dict(raw, tests=tuple(raw.get("tests", ())))
        entry = Entry(**raw)
        if entry.status not in STATUSES:
            raise ValueError(f"catalog entry {entry.id!r}: status={entry.status!r}; use one of {STATUSES}")
        if entry.survey not in SECTION_TITLES:
            raise ValueError(f"catalog entry {entry.id!r}: survey={entry.survey!r} is not a known section")
        if entry.implemented and not (entry.symbol and entry.tests and entry.chapter):
            raise ValueError(f"catalog entry {entry.id!r} is implemented but lacks a symbol, tests or chapter")
        entries.append(entry)
    ids = [e.id for e in entries]
    if len(ids) != len(set(ids)):
        raise ValueError(f"catalog ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}")
    return entries


def resolve(symbol: str) -> object:
    """Import a dotted path such as ``effref.models.llama.Attention`` (module, then attributes)."""
    parts = symbol.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"symbol={symbol!r}: no importable module prefix")


def _chapter_link(chapter: str) -> str:
    # Coverage page sits in book/, chapters below it; MyST resolves {doc} paths without the suffix.
    target = Path(chapter).with_suffix("").as_posix().removeprefix("book/")
    return f"{{doc}}`{target}`"


def render_markdown(entries: list[Entry]) -> str:
    """The Coverage page: a summary line, then one table per survey section, in the survey's order."""
    done = sum(e.implemented for e in entries)
    lines = [
        "# Coverage",
        "",
        "Every core technique in the survey's taxonomy, and where this book implements, tests and teaches it.",
        f"**{done} of {len(entries)}** are implemented so far; the other {len(entries) - done} are planned and not",
        "written yet. This page is generated from `effref/catalog.yml` by",
        "`python -m effref.catalog --write book/coverage.md`, and a test keeps both in step.",
        "",
    ]
    by_section: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries:
        by_section[entry.survey].append(entry)
    for section in sorted(by_section, key=lambda s: [int(p) for p in s.split(".")]):
        lines += [f"## §{section} {SECTION_TITLES[section]}", "",
                  "| Technique | Citation | Status | Symbol | Tests | Chapter |",
                  "|---|---|---|---|---|---|"]
        for e in by_section[section]:
            status = "✅ implemented" if e.implemented else "planned"
            symbol = f"`{e.symbol}`" + (f" ({e.usage})" if e.usage else "") if e.symbol else ""
            tests = ", ".join(f"`{t}`" for t in e.tests)
            chapter = _chapter_link(e.chapter) if e.chapter else ""
            lines.append(f"| {e.technique} | {e.citation} | {status} | {symbol} | {tests} | {chapter} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effref.catalog", description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="write the Coverage page here (else print it)")
    args = parser.parse_args(argv)
    page = render_markdown(load_catalog())
    if args.write:
        args.write.write_text(page)
    else:
        print(page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
