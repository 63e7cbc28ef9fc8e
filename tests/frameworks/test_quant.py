"""Quantization libraries beside ours on a tiny random LLaMA: each library row runs (bitsandbytes, torchao), each
method stays close to the unquantized model and to its peer of the same family, and NF4 codes are bit-exact."""

import importlib.util

import pytest
import torch
from frameworks.helpers import ids, tiny_hf_llama
from torch import nn

from effref.frameworks import METHODS, block_linear_bytes, nf4_codes_row, quantization_rows

pytestmark = pytest.mark.usefixtures("one_thread")
LIBS = all(importlib.util.find_spec(m) for m in ("bitsandbytes", "torchao"))


@pytest.mark.skipif(not LIBS, reason="bitsandbytes or torchao is not installed")
def test_every_method_runs_and_peers_of_a_family_agree():
    model = tiny_hf_llama(seed=0)
    rows = quantization_rows(model, ids((512,), seed=2).flatten(), ids((4, 48), seed=3), window=128,
                             max_windows=2)
    assert [r.method for r in rows[1:]] == [m[0] for m in METHODS]
    assert all(r.status == "ok" for r in rows), [(r.method, r.reason) for r in rows if r.status != "ok"]
    base = rows[0]
    by_family = {}
    for r in rows[1:]:
        by_family.setdefault(r.family, []).append(r)
        assert r.linear_bytes < base.linear_bytes, r  # every method stores fewer bytes than fp32
        assert abs(r.perplexity / base.perplexity - 1) < 0.01, r
    for family in ("W8", "W8A8", "LLM.int8"):  # 8-bit: the library and ours within 0.1% of each other
        lib, ours = by_family[family]
        assert abs(lib.perplexity / ours.perplexity - 1) < 1e-3, (lib, ours)
    for r in rows:  # 8-bit methods stay within 0.1% of the unquantized perplexity (4-bit: within 1%, above)
        if r.family in ("W8", "W8A8", "LLM.int8"):
            assert abs(r.perplexity / base.perplexity - 1) < 1e-3, r


@pytest.mark.skipif(not LIBS, reason="bitsandbytes is not installed")
def test_nf4_codes_are_bit_exact_with_bitsandbytes():
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    codes, dequantized = nf4_codes_row(weight)
    assert codes.status == "ok" and codes.agreement == 1.0
    assert dequantized.agreement < 1e-6


def test_a_failing_method_becomes_a_row_and_bad_models_are_refused():
    def broken(model, calib):
        raise RuntimeError("needs CUDA")

    rows = quantization_rows(tiny_hf_llama(), ids((300,)).flatten(), None, window=64, max_windows=1,
                             methods=(("broken", "effref", "W4", broken),))
    assert rows[1].status == "failed" and "needs CUDA" in rows[1].reason and rows[1].perplexity is None
    with pytest.raises(TypeError, match="LLaMA-shaped"):
        quantization_rows(nn.Linear(4, 4), ids((300,)).flatten(), None)


def test_block_linear_bytes_counts_the_fp32_weights():
    model = tiny_hf_llama()
    n_weights = sum(m.weight.numel() for layer in model.model.layers for m in layer.modules()
                    if isinstance(m, nn.Linear))
    assert 4 * n_weights < block_linear_bytes(model) < 4 * n_weights * 1.05  # plus the pickle's small overhead
