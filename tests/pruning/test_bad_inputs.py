"""Bad input to the pruning entry points: each is refused before anything changes, with an error naming the
argument and the fix (one table for the subpackage)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_families import CALIB, FAMILIES

from effref.pruning import PruneConfig, magnitude_prune_model, sparsegpt_prune_model, wanda_prune_model
from effref.pruning.llm_pruner import LLMPrunerConfig, llm_prune
from effref.pruning.sparsegpt import SparseGPTConfig

MODEL = FAMILIES["llama"]
BAD = [
    ("sparsity above 1", lambda m: magnitude_prune_model(m, PruneConfig(1.5)), ValueError,
     r"sparsity=1\.5 must be in \[0, 1\)"),
    ("N:M written wrong", lambda m: wanda_prune_model(m, CALIB, PruneConfig(nm="2/4")), ValueError,
     r"nm='2/4' is not an N:M pattern"),
    ("N > M", lambda m: wanda_prune_model(m, CALIB, PruneConfig(nm="5:4")), ValueError, r"more than there are"),
    ("N:M that does not divide the layer", lambda m: magnitude_prune_model(m, PruneConfig(nm="2:48")), ValueError,
     r"needs in_features divisible by M=48"),
    ("Wanda without calibration", lambda m: wanda_prune_model(m, None, PruneConfig(0.5)), ValueError,
     r"calib"),
    ("SparseGPT with float batches", lambda m: sparsegpt_prune_model(m, CALIB.float(), PruneConfig(0.5)), ValueError,
     r"calib_batches must be a \(n, T\) tensor of token ids"),
    ("SparseGPT block size", lambda m: sparsegpt_prune_model(m, CALIB, SparseGPTConfig(0.5, block_size=0)), ValueError,
     r"block_size=0 must be a positive integer"),
    ("pruner called in the old order", lambda m: wanda_prune_model(m, PruneConfig(0.5), CALIB), TypeError,
     r"takes \(model, calib_batches, cfg\)"),
    ("config of another method", lambda m: magnitude_prune_model(m, LLMPrunerConfig()), TypeError,
     r"cfg must be a PruneConfig"),
    ("LLM-Pruner ratio", lambda m: llm_prune(m, CALIB, LLMPrunerConfig(ratio=1.0)), ValueError,
     r"ratio=1\.0 must be in \[0, 1\)"),
    ("LLM-Pruner head mode", lambda m: llm_prune(m, CALIB, LLMPrunerConfig(heads="kv")), ValueError,
     r"heads='kv' is not known"),
    ("LLM-Pruner block range", lambda m: llm_prune(m, CALIB, LLMPrunerConfig(first=1, last=1)), ValueError,
     r"first=1, last=1 must satisfy"),
    ("LLM-Pruner without data", lambda m: llm_prune(m, None, LLMPrunerConfig()), ValueError,
     r"pass batches=\(n, T\) token ids or gradients="),
]


@pytest.mark.parametrize("what, call, error, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_by_name_and_changes_nothing(what, call, error, message):
    torch.manual_seed(0)
    model = MODEL().eval()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        call(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
