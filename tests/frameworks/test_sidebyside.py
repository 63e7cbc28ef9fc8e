"""Each side-by-side row against the real library, on tiny random models: our implementation must agree with it
(the rows measure that), and a library that is missing or breaks gives a row that says why instead of an error."""

import importlib.util

import pytest
import torch
from frameworks.helpers import ids, tiny_hf_llama

from effref.frameworks import (
    CUDA_ONLY,
    Row,
    architecture_rows,
    attention_rows,
    generation_rows,
    guarded,
    lora_rows,
    zero_rows,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed")


def ok(rows: list[Row]) -> dict[str, Row]:
    assert all(r.status == "ok" for r in rows), [r.reason for r in rows if r.status != "ok"]
    return {r.comparison: r for r in rows}


@needs("peft")
def test_lora_equals_peft_with_the_same_adapters_and_merged():
    rows = ok(lora_rows(tiny_hf_llama(), ids(), r=4, repeats=1))
    forward, merged = rows["LoRA forward (r=4, q/v)"], rows["LoRA merged into the weights"]
    assert forward.library.startswith("peft ") and forward.agreement < 1e-5 and merged.agreement < 1e-5
    assert forward.time_ratio > 0


@needs("peft")
def test_lora_row_would_catch_a_different_adapter(monkeypatch):
    from effref.peft import lora

    monkeypatch.setattr(lora.LoraLinear, "forward", lambda self, x: self.base(x))  # an adapter that does nothing
    rows = ok(lora_rows(tiny_hf_llama(), ids(), r=4, repeats=1))
    assert rows["LoRA forward (r=4, q/v)"].agreement > 1e-3


def test_llama_and_paged_decode_attention_equal_sdpa():
    rows = ok(attention_rows(tiny_hf_llama(), ids(), repeats=1))
    assert rows["LLaMA forward (SDPA attention)"].agreement < 1e-4
    assert rows["decode attention over a paged KV cache"].agreement < 1e-5


def test_engine_generates_the_tokens_of_generate_and_of_continuous_batching():
    prompts = [list(range(1, 9)), [5, 6, 7], list(range(20, 40))]
    rows = ok(generation_rows(tiny_hf_llama(), prompts, new_tokens=6))
    assert rows["greedy generation, static batch"].agreement == 1.0
    assert rows["greedy generation, continuous batching"].agreement == 1.0
    assert "generate_batch" in rows["greedy generation, continuous batching"].library


def test_generation_refuses_an_empty_request_list():
    with pytest.raises(ValueError, match="at least one prompt"):
        generation_rows(tiny_hf_llama(), [], new_tokens=4)


@needs("rwkv")
def test_rwkv_package_and_transformers_architectures_equal_ours():
    rows = architecture_rows(repeats=1)
    assert {r.library.split()[0] for r in rows} == {"rwkv", "transformers"}
    for row in rows:
        assert row.status == "ok", row.reason
        assert row.agreement < 1e-4, row


def test_a_missing_or_failing_library_becomes_a_row_that_says_why():
    def missing():
        import no_such_library_here  # noqa: F401

    def failing():
        raise RuntimeError("needs a CUDA device\nmore detail")

    [gone] = guarded("x", "no_such_library_here", "ours", "max", missing)
    [broken] = guarded("x", "lib", "ours", "max", failing)
    assert gone.status == "unavailable" and "no_such_library_here" in gone.reason
    assert broken.status == "failed" and broken.reason == "RuntimeError: needs a CUDA device"
    assert gone.agreement is None and broken.time_ratio is None


def test_zero_row_reads_effref_distributed_or_says_not_available():
    [row] = zero_rows()[:1]
    assert row.status in ("ok", "unavailable", "failed")
    if row.status == "unavailable":
        assert "not available" in row.reason


def test_cuda_only_libraries_carry_a_citation_in_the_bibliography():
    from pathlib import Path

    bib = (Path(__file__).resolve().parents[2] / "book" / "references.bib").read_text()
    for entry in CUDA_ONLY:
        assert f"{{{entry['cite']}," in bib, entry["cite"]
        assert torch is not None and entry["published claim"]


def test_zero_rows_come_from_effref_distributed_when_it_offers_them(monkeypatch):
    import effref.distributed

    fake = [{"comparison": "stage 2 vs ZeroRedundancyOptimizer", "library": "torch", "ours": "ZeroEngine",
             "metric": "max |Δ loss|", "agreement": 1e-7, "time_ratio": 1.2}]
    monkeypatch.setattr(effref.distributed, "zero_side_by_side", lambda: fake, raising=False)
    [row] = zero_rows()
    assert row.status == "ok" and row.comparison == "ZeRO · stage 2 vs ZeroRedundancyOptimizer"
