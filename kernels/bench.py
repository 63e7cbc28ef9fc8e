"""Benchmark every kernel against its PyTorch baselines and against the roofline of the GPU it runs on.

Usage::

    python -m effref.kernels.bench                  # all kernels, print a table
    python -m effref.kernels.bench --only rmsnorm --out results.json
    python -m effref.kernels.bench --check          # correctness only (on CPU: under the Triton interpreter)

For each kernel, dtype and shape the bench first checks the kernel against its reference and stops with exit
status 1 on a mismatch: a fast wrong kernel is not a result. It then times the kernel and each baseline with
``triton.testing.do_bench`` (median of repeated runs, L2 cache flushed between runs), and reports

- achieved GB/s = ideal bytes moved / time, and TFLOP/s when the entry counts FLOPs;
- % of roofline = the fastest time the device allows, max(bytes / peak bandwidth, FLOPs / peak FLOP/s),
  divided by the measured time (100 % is the hardware limit; only for devices in ``PEAKS``);
- speedup over each baseline = baseline time / kernel time.

Timing needs a CUDA GPU. On a machine without one the command says so and exits 0; ``--check`` still runs the
correctness checks there, under the interpreter, at each entry's small ``check_shapes``.

Adding a kernel: put ``BENCHMARK = Benchmark(...)`` (see ``kernels/_runtime.py``) at the bottom of
``kernels/<name>.py``. This command imports every public module of the package and collects those entries,
so it never needs editing. A module may also expose a list of entries.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import pkgutil
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from effref import kernels
from effref.kernels._runtime import INSTALL_HINT, Benchmark, Shape


@dataclass(frozen=True)
class DevicePeak:
    """Datasheet peaks of one GPU: memory bandwidth and dense (no sparsity) throughput."""

    name: str
    hbm_gbps: float  # GB/s, 1 GB = 10⁹ bytes
    tflops_16bit: float  # fp16 / bf16 tensor cores, dense
    tflops_fp32: float  # fp32 on the CUDA cores (no TF32)
    tops_int8: float  # int8 tensor cores, dense (TOPS)


# From NVIDIA's product datasheets (bandwidth in GB/s, throughput in TFLOP/s). The datasheets quote tensor
# throughput "with sparsity"; the dense figure used here is half of it. A row applies when all the words in
# front appear in torch.cuda.get_device_name() (case-insensitive, '-' read as a space); the first match wins,
# so the more specific names come first. T4 has no bf16 support; its 16-bit figure is fp16. The T4's int8 figure
# is already dense (it has no sparse tensor cores).
PEAKS: list[tuple[tuple[str, ...], DevicePeak]] = [
    (("H200", "NVL"), DevicePeak("H200 NVL", 4800, 835, 60, 1670)),
    (("H200",), DevicePeak("H200 SXM", 4800, 989, 67, 1979)),
    (("H100", "NVL"), DevicePeak("H100 NVL", 3900, 835, 60, 1670)),
    (("H100", "PCIe"), DevicePeak("H100 PCIe", 2000, 756, 51, 1513)),
    (("H100",), DevicePeak("H100 SXM", 3350, 989, 67, 1979)),
    (("A100", "80GB", "PCIe"), DevicePeak("A100 80GB PCIe", 1935, 312, 19.5, 624)),
    (("A100", "80GB"), DevicePeak("A100 80GB SXM", 2039, 312, 19.5, 624)),
    (("L4",), DevicePeak("L4", 300, 121, 30.3, 242)),
    (("T4",), DevicePeak("T4", 320, 65, 8.1, 130)),
]


def match_peak(device_name: str) -> DevicePeak | None:
    """The datasheet entry for a CUDA device name such as 'NVIDIA H100 80GB HBM3', or None if unknown."""
    words = device_name.upper().replace("-", " ").split()  # whole words: "L4" must not match "L40S"
    for needles, peak in PEAKS:
        if all(needle.upper() in words for needle in needles):
            return peak
    return None


def discover(only: set[str] | None = None) -> tuple[list[Benchmark], list[str]]:
    """Import every public kernel module and collect its ``BENCHMARK`` entries; report modules that fail."""
    found: list[Benchmark] = []
    errors: list[str] = []
    for info in pkgutil.iter_modules(kernels.__path__):
        if info.name.startswith("_") or info.name == "bench":
            continue
        try:
            module = importlib.import_module(f"effref.kernels.{info.name}")
        except Exception as exc:  # noqa: BLE001  a colleague's broken module must not hide the others
            errors.append(f"effref.kernels.{info.name} did not import: {type(exc).__name__}: {exc}")
            continue
        entries = getattr(module, "BENCHMARK", [])
        for entry in [entries] if isinstance(entries, Benchmark) else list(entries):
            if only is None or entry.name in only:
                found.append(entry)
    return found, errors


class KernelMismatch(AssertionError):
    """The kernel disagrees with its reference; the bench refuses to time it."""


def check_one(bench: Benchmark, shape: Shape, dtype: torch.dtype, device: torch.device,
              inputs: tuple | None = None) -> dict:
    """Run kernel and reference on the same inputs; raise KernelMismatch beyond the entry's tolerance."""
    inputs = bench.make_inputs(shape, dtype, device) if inputs is None else inputs
    out = bench.kernel(*inputs)
    ref = bench.reference(*inputs)
    atol, rtol = bench.tolerance.get(dtype, (1e-5, 1e-5))
    try:
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    except AssertionError as exc:
        raise KernelMismatch(f"{bench.name} {shape} {dtype}: kernel and reference disagree\n{exc}") from exc
    err = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    return {"kernel": bench.name, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
            "max_abs_err": err, "atol": atol, "rtol": rtol}


def gpu_time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn()`` on the GPU, L2 flushed before each run (Triton's ``do_bench``)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def time_one(bench: Benchmark, shape: Shape, dtype: torch.dtype, peak: DevicePeak | None,
             device: torch.device | None = None, timer: Callable[[Callable[[], object]], float] = gpu_time_ms,
             ) -> dict:
    """Check, then time the kernel and its baselines; derive GB/s, TFLOP/s, % of roofline and speedups."""
    device = torch.device("cuda") if device is None else device
    inputs = bench.make_inputs(shape, dtype, device)
    record = check_one(bench, shape, dtype, device, inputs)
    fns = {"triton": bench.kernel, **bench.baselines}
    ms = {name: timer(lambda fn=fn: fn(*inputs)) for name, fn in fns.items()}  # the kernel first
    n_bytes = bench.bytes_moved(shape, dtype)
    n_flops = bench.flops(shape, dtype) if bench.flops else None
    seconds = ms["triton"] * 1e-3
    record.update(
        bytes=n_bytes, flops=n_flops, ms=ms,
        gbps=n_bytes / seconds / 1e9,
        tflops=n_flops / seconds / 1e12 if n_flops else None,
        speedup={name: ms[name] / ms["triton"] for name in bench.baselines},
        pct_roofline=None,
    )
    if peak is not None:
        if bench.compute == "int8":
            tflops_peak = peak.tops_int8
        else:
            tflops_peak = peak.tflops_16bit if dtype in (torch.float16, torch.bfloat16) else peak.tflops_fp32
        best_s = n_bytes / (peak.hbm_gbps * 1e9)  # the bandwidth roof
        if n_flops:
            best_s = max(best_s, n_flops / (tflops_peak * 1e12))  # the compute roof
        record["pct_roofline"] = 100 * best_s / seconds
    return record


def environment() -> dict:
    """Versions and device, written at the top of the JSON so results can be compared honestly."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": None, "interpreted": kernels.INTERPRETED, "device": "cpu (Triton interpreter)"}
    if kernels.triton_available():
        import triton

        info["triton"] = triton.__version__
    if not kernels.INTERPRETED and torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        peak = match_peak(info["device"])
        info["peak"] = None if peak is None else vars(peak)
    return info


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_checks(records: list[dict]) -> None:
    print(f"{'kernel':<16}{'dtype':<10}{'shape':<20}{'max |err|':>12}{'atol':>10}{'rtol':>10}  ok")
    for r in records:
        shape = "×".join(map(str, r["shape"]))
        print(f"{r['kernel']:<16}{r['dtype']:<10}{shape:<20}{r['max_abs_err']:>12.2e}{r['atol']:>10.0e}"
              f"{r['rtol']:>10.0e}  ✓")


def print_timings(records: list[dict]) -> None:
    baselines = sorted({name for r in records for name in r["speedup"]})
    head = f"{'kernel':<12}{'dtype':<10}{'shape':<14}{'µs':>9}{'GB/s':>9}{'TFLOP/s':>9}{'%roof':>7}"
    print(head + "".join(f"{'× ' + b:>14}" for b in baselines))
    for r in records:
        shape = "×".join(map(str, r["shape"]))
        row = (f"{r['kernel']:<12}{r['dtype']:<10}{shape:<14}{r['ms']['triton'] * 1e3:>9.1f}"
               f"{r['gbps']:>9.0f}{_fmt(r['tflops'], '.2f'):>9}{_fmt(r['pct_roofline'], '.0f'):>7}")
        print(row + "".join(f"{_fmt(r['speedup'].get(b), '.2f'):>14}" for b in baselines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effref.kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", metavar="NAME[,NAME]",
                        help="benchmark only these entries (repeatable, or comma separated)")
    parser.add_argument("--out", type=Path, help="write the results as JSON to this path")
    parser.add_argument("--check", action="store_true",
                        help="correctness checks only; on CPU they run under the Triton interpreter")
    args = parser.parse_args(argv)

    if not kernels.triton_available():
        print(f"Triton is not installed; run {INSTALL_HINT} (Linux only).", file=sys.stderr)
        return 1
    only = {name.strip() for item in args.only or [] for name in item.split(",") if name.strip()} or None
    benches, errors = discover(only)
    for line in errors:
        print(f"warning: {line}", file=sys.stderr)
    missing = sorted((only or set()) - {b.name for b in benches})
    if missing:
        known = sorted(b.name for b in discover()[0])
        parser.error(f"--only names {missing} that no kernel module registers; known: {known}")

    print(kernels.describe())
    on_gpu = not kernels.INTERPRETED and torch.cuda.is_available()
    if not on_gpu and not args.check:
        print("Benchmarks need a CUDA GPU, and none is in use here. Run with --check to verify the kernels "
              "against their references under the Triton interpreter on CPU.")
        return 0
    if not on_gpu and not kernels.INTERPRETED:
        print("No CUDA GPU, and the interpreter is switched off (EFFREF_TRITON_INTERPRET=0); unset it to "
              "run --check on CPU.", file=sys.stderr)
        return 1

    results = {**environment(), "mode": "check" if args.check else "bench", "results": []}
    peak = match_peak(results["device"]) if on_gpu else None
    if on_gpu and peak is None:
        print(f"{results['device']} is not in the datasheet table: absolute numbers only, no % of roofline.")
    try:
        for bench in benches:
            for dtype in bench.dtypes:
                if args.check:
                    device = torch.device("cuda" if on_gpu else "cpu")
                    shapes = list(bench.check_shapes) + (list(bench.shapes) if on_gpu else [])
                    results["results"] += [check_one(bench, s, dtype, device) for s in shapes]
                else:
                    results["results"] += [time_one(bench, s, dtype, peak) for s in bench.shapes]
    except KernelMismatch as exc:
        print(f"MISMATCH — {exc}", file=sys.stderr)
        return 1

    if args.check:
        print_checks(results["results"])
    else:
        peaks = f" (peaks of {peak.name}: {peak.hbm_gbps:.0f} GB/s, {peak.tflops_16bit:.0f} TFLOP/s dense)"
        print(f"device: {results['device']}" + (peaks if peak else ""))
        print_timings(results["results"])
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 1 if errors and only is None else 0


if __name__ == "__main__":
    sys.exit(main())
