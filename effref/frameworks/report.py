"""The book's performance report: every chapter's recorded numbers, its headline numbers with the chapter that
measured them, and the Triton kernels' GPU measurements and CPU-interpreter checks.

Where the numbers come from. ``effref.plotting.glue`` writes every number a chapter glues into that chapter's
JSON record (``effref.plotting.records_dir()``, by default ``_build/records/``) when the chapter runs. The
report (``book/reference/performance_report.md``) reads those records; it copies no number by hand, and a chapter
that has not run (or does not glue a number yet) shows as such instead of failing. Kernel timings come only from
the committed ``kernels/results/*.json`` that ``kernels/measure_on_gpu.sh`` writes on a GPU.

Regenerate everything (each chapter writes its record, then the report, collected last, reads them)::

    EFFREF_PROGRESS=0 .venv/bin/pytest -q book/          # or just the report: book/reference/performance_report.md
    python -m effref.frameworks.report                  # the same tables as text, from the records on disk

Glossary: record = one chapter's ``{name: value}`` from its last run · headline = a number the survey's claims
hinge on, listed in ``HEADLINES`` with the chapter that measures it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Headline:
    topic: str
    label: str
    chapter: str  # path from the repository root
    name: str  # the glue name the chapter records


HEADLINES: tuple[Headline, ...] = (
    Headline("compression", "mixed-sparsity allocation: perplexity", "book/compression/pruning.md", "alloc_ppl"),
    Headline("compression", "uniform sparsity: perplexity", "book/compression/pruning.md", "uniform_ppl"),
    Headline("compression", "ours RTN W4 g32: perplexity", "book/frameworks/frameworks.md", "ppl_rtn_w4"),
    Headline("compression", "bitsandbytes NF4: perplexity", "book/frameworks/frameworks.md", "ppl_bnb_nf4"),
    Headline("compression", "unquantized SmolLM2: perplexity", "book/frameworks/frameworks.md", "ppl_fp32"),
    Headline("compression", "weight-only quantization: perplexity against bits",
             "book/compression/quantization_weights.md", "ppl_gptq3"),
    Headline("serving", "continuous batching: throughput over static generate", "book/inference/serving.md",
             "throughput_ratio"),
    Headline("serving", "engine with a draft: measured speed-up", "book/inference/serving.md", "spec_measured"),
    Headline("serving", "engine with a draft: speed-up in theory", "book/inference/serving.md", "spec_theory"),
    Headline("serving", "our engine / transformers generate: time", "book/frameworks/frameworks.md",
             "engine_time_ratio"),
    Headline("training", "AdamW: bits per byte", "book/pretraining/mixed_precision_optimizers.md", "bpb_adamw"),
    Headline("training", "Lion: bits per byte", "book/pretraining/mixed_precision_optimizers.md", "bpb_lion"),
    Headline("training", "Sophia: bits per byte", "book/pretraining/mixed_precision_optimizers.md", "bpb_sophia"),
    Headline("training", "data parallelism: model-state bytes per parameter per rank", "book/pretraining/distributed.md",
             "bpp_dp"),
    Headline("training", "ZeRO stage 3: model-state bytes per parameter per rank", "book/pretraining/distributed.md",
             "bpp_z3"),
    Headline("training", "ZeRO stage 3: saving over data parallelism", "book/pretraining/distributed.md",
             "stage3_saving"),
    Headline("training", "our ZeRO engines: largest loss gap to one process", "book/pretraining/distributed.md",
             "worst_ours"),
    Headline("training", "DeepSpeed ZeRO: largest loss gap to one process", "book/pretraining/distributed.md",
             "worst_ds"),
    Headline("architecture", "LLaMA: bits per byte", "book/architecture/alternatives.md", "bits_llama"),
    Headline("architecture", "Mamba: bits per byte", "book/architecture/alternatives.md", "bits_mamba"),
    Headline("architecture", "RWKV: bits per byte", "book/architecture/alternatives.md", "bits_rwkv"),
    Headline("architecture", "FFT over direct convolution at the longest length", "book/architecture/alternatives.md",
             "fft_speedup"),
    Headline("architecture", "MoE over its dense twin: validation-loss gain (nats)", "book/architecture/moe.md",
             "moe_gain"),
)


def load_records(directory: str | Path | None = None) -> dict[str, dict[str, dict]]:
    """``{chapter path: {name: {"value", "at"}}}`` from every record in ``directory`` (default
    ``records_dir()``); an unreadable file is skipped (a record being written is replaced atomically)."""
    from effref.plotting import records_dir  # matplotlib is an optional dependency: import on use

    directory = records_dir() if directory is None else Path(directory)
    records = {}
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            records[data["chapter"]] = data["values"]
        except (OSError, ValueError, KeyError):
            continue
    return records


def headline_rows(records: dict[str, dict[str, dict]] | None = None) -> list[dict]:
    """One row per headline: its value and when it was recorded, or the reason there is none."""
    records = load_records() if records is None else records
    rows = []
    for h in HEADLINES:
        entry = records.get(h.chapter, {}).get(h.name)
        if entry is not None:
            status = "recorded"
        elif not (ROOT / h.chapter).exists():
            status = "chapter not written yet"
        elif h.chapter not in records:
            status = "not run yet"
        else:
            status = "not recorded: the chapter does not glue this number yet"
        rows.append({"topic": h.topic, "number": h.label, "value": None if entry is None else entry["value"],
                     "recorded at": None if entry is None else entry["at"], "status": status,
                     "chapter": h.chapter, "name": h.name})
    return rows


def kernel_results(results_dir: str | Path | None = None) -> list[dict]:
    """Every GPU measurement file (``kernels/results/*.json``): one dict per file, as the bench wrote it."""
    if results_dir is None:
        from effref.kernels import RESULTS_DIR as results_dir
    files = sorted(Path(results_dir).glob("*.json")) if Path(results_dir).is_dir() else []
    return [dict(json.loads(p.read_text()), file=p.name) for p in files]


def kernel_checks() -> tuple[list[dict], str]:
    """Run every kernel against its reference at its small check shapes on this machine (the Triton
    interpreter on a CPU): (one dict per check, a note); a kernel that disagrees or fails is reported in the
    note, never raised."""
    import torch

    from effref import kernels

    if not kernels.triton_available():
        return [], "Triton is not installed: no kernel checks here"
    from effref.kernels import bench

    benches, errors = bench.discover()
    device = torch.device("cuda" if not kernels.INTERPRETED and torch.cuda.is_available() else "cpu")
    rows, problems = [], list(errors)
    for b in benches:
        for dtype in b.dtypes:
            for shape in b.check_shapes:
                try:
                    rows.append(bench.check_one(b, shape, dtype, device))
                except Exception as exc:  # noqa: BLE001 (a mismatch or a crash is a finding for the page)
                    problems.append(f"{b.name} {shape}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    return rows, f"{kernels.describe()}" + ("; problems: " + "; ".join(problems) if problems else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effref.frameworks.report",
                                     description="print the book's recorded headline numbers and kernel results")
    parser.add_argument("--records", type=Path, default=None, help="records folder (default: records_dir())")
    args = parser.parse_args(argv)
    for row in headline_rows(load_records(args.records)):
        value = "—" if row["value"] is None else f"{row['value']:.4g}"
        print(f"{row['topic']:<13}{row['number'][:58]:<60}{value:>10}  {row['status'][:30]:<32}{row['chapter']}")
    results = kernel_results()
    print(f"kernel GPU result files: {len(results)}" + ("" if results else " (no GPU has run the bench yet)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
