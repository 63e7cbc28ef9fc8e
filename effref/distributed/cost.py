"""What pre-training costs: the survey's Table 1 as data, and the 6·N·D rule that estimates it.

Sources: Wan et al. (2024), "Efficient Large Language Models: A Survey", Table 1 (each row cites the model's own
paper); the rule from Kaplan et al. (2020), "Scaling laws for neural language models", arXiv:2001.08361, §2.1.
Implements: training a dense transformer of N parameters on D tokens costs about
    C ≈ 6 · N · D floating-point operations
(2 per parameter and token for the forward pass, 4 for the backward pass; attention over the context adds a
small term that the rule leaves out). A run on n chips of peak throughput P for a wall-clock time T can deliver
at most n · P · T; the share it used, the model FLOPs utilisation, is
    MFU = C / (n · P · T),
and, read the other way, T = C / (n · P · MFU) predicts the training time.
For a sparse mixture of experts, N is the parameters one token passes through (the activated ones).
Glossary: N ``params`` · D ``tokens`` · C ``training_flops`` · n ``chips`` · P ``PEAK_FLOPS`` · T ``days``.
Peak throughputs are the vendors' dense 16-bit figures per chip: NVIDIA A100 312 TFLOP/s (bf16/fp16 tensor
cores), Google TPU v3 123 TFLOP/s and TPU v4 275 TFLOP/s (bf16), Huawei Ascend 910 256 TFLOP/s (fp16).
Left out: the rows' costs in money and energy (the table does not give them), the attention term of C.
Table entries are as the survey prints them; ``note`` says where we read a value differently and why.
"""

from __future__ import annotations

from dataclasses import dataclass

PEAK_FLOPS = {"A100": 312e12, "TPU-v3": 123e12, "TPU-v4": 275e12, "Ascend 910": 256e12}  # per chip, per s
SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class Run:
    """One row of the survey's Table 1: what was trained, on what, for how long (None: not given)."""

    model: str
    params: float | None  # N as printed
    data: str  # the "Data Scale" column as printed
    tokens: float | None  # D in tokens, when the table gives tokens (not a corpus size in bytes)
    chips: int | None
    hardware: str | None
    days: float | None  # wall-clock training time
    chip_days: float | None = None  # LLaMA-2 gives GPU days instead of a wall-clock time
    active_params: float | None = None  # for a sparse model, the parameters one token uses
    note: str = ""


TABLE_1 = (
    Run("GPT-3", 175e9, "300B tokens", 300e9, None, None, None),
    Run("GPT-NeoX-20B", 20e9, "825GB corpus", None, 96, "A100", None),
    Run("OPT", 175e9, "180B tokens", 180e9, 992, "A100", None),
    Run("BLOOM", 176e9, "366B tokens", 366e9, 384, "A100", 105),
    Run("GLM", 130e9, "400B tokens", 400e9, 786, "A100", 60),
    Run("LLaMA", 65e9, "1.4T tokens", 1.4e12, 2048, "A100", 21),
    Run("LLaMA-2", 70e9, "2T tokens", 2e12, None, "A100", None, chip_days=71_680),
    Run("Gopher", 280e9, "300B tokens", 300e9, 1024, "A100", 13.4),
    Run("LaMDA", 137e9, "768B tokens", 768e9, 1024, "TPU-v3", 57.7),
    Run("GLaM", 1200e9, "280B tokens", 280e9, 1024, "TPU-v4", 574 / 24, active_params=96.6e9,
        note="mixture of experts: 96.6B of its 1.2T parameters are activated per token (Du et al., 2022)"),
    Run("PanGu-α", 13e9, "1.1TB corpus", None, 2048, "Ascend 910", None),
    Run("PanGu-Σ", 1085e9, "329B tokens", 329e9, 512, "Ascend 910", 100,
        note="sparse (random-routed experts); the table gives no activated parameter count"),
    Run("PaLM", 540e9, "780B tokens", 780e9, 6144, "TPU-v4", None),
    Run("PaLM-2", None, "3.6T tokens", 3.6e12, None, "TPU-v4", None),
    Run("WeLM", 10e9, "300B tokens", 300e9, 128, "A100", 24),
    Run("Flan-PaLM", 540e9, "-", None, 512, "TPU-v4", 37 / 24,
        note="instruction fine-tuning of PaLM, not pre-training"),
    Run("AlexaTM", 20e9, "1.3 tokens", 1.3e12, 128, "A100", 120,
        note="the table prints '1.3 tokens'; read as 1.3T tokens (Soltan et al., 2022)"),
    Run("CodeGeeX", 13e9, "850 tokens", 850e9, 1536, "Ascend 910", 60,
        note="the table prints '850 tokens'; read as 850B tokens (Zheng et al., 2023)"),
    Run("MPT-7B", 7e9, "1T tokens", 1e12, None, None, None),
)

REPORTED_FLOPS = {"GPT-3": 3.14e23}  # Brown et al. (2020), Table D.1: 3.14e23 FLOPs for GPT-3 175B


def training_flops(params: float, tokens: float) -> float:
    """C ≈ 6·N·D: forward (2 FLOPs per parameter and token) plus backward (4)."""
    if not params > 0 or not tokens > 0:
        raise ValueError(f"params={params!r} and tokens={tokens!r} must both be > 0")
    return 6 * params * tokens


def chip_seconds(run: Run) -> float | None:
    """n · T in chip-seconds, from chips × days or from chip-days; None when the row gives neither."""
    if run.chip_days is not None:
        return run.chip_days * SECONDS_PER_DAY
    if run.chips is None or run.days is None:
        return None
    return run.chips * run.days * SECONDS_PER_DAY


def utilisation(run: Run, activated: bool = True) -> float | None:
    """MFU = 6·N·D / (n · P · T), with N the activated parameters of a sparse model (all: ``activated=False``).

    None when the row lacks tokens, parameters, hardware or time.
    """
    params = run.active_params if activated and run.active_params else run.params
    seconds = chip_seconds(run)
    if params is None or run.tokens is None or seconds is None or run.hardware is None:
        return None
    return training_flops(params, run.tokens) / (PEAK_FLOPS[run.hardware] * seconds)


def training_days(flops: float, chips: int, hardware: str, mfu: float) -> float:
    """Predicted wall-clock days, T = C / (n · P · MFU)."""
    if hardware not in PEAK_FLOPS:
        raise ValueError(f"hardware={hardware!r} is not one of {sorted(PEAK_FLOPS)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu!r} must lie in (0, 1]; 0.3–0.5 is typical of large runs")
    if not isinstance(chips, int) or chips < 1:
        raise ValueError(f"chips={chips!r} must be a positive int")
    return flops / (chips * PEAK_FLOPS[hardware] * mfu) / SECONDS_PER_DAY


def table_rows() -> list[dict]:
    """Table 1 with the calculator's columns: 6·N·D, chip-days, and the utilisation they imply."""
    rows = []
    for run in TABLE_1:
        params = run.active_params or run.params
        seconds = chip_seconds(run)
        rows.append({"model": run.model, "N": run.params, "data": run.data, "chips": run.chips,
                     "hardware": run.hardware, "days": run.days,
                     "6ND FLOPs": training_flops(params, run.tokens) if params and run.tokens else None,
                     "reported FLOPs": REPORTED_FLOPS.get(run.model),
                     "chip-days": None if seconds is None else seconds / SECONDS_PER_DAY,
                     "MFU": utilisation(run), "note": run.note})
    return rows
