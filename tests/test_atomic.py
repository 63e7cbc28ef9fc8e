"""Every model-level compression call is all or nothing: when one layer is refused, the model is exactly as it was.

The defect sits in the *last* block, so that a call which changed layers as it went would already have rewritten
the first block when it meets it: its parameters, buffers and module types are compared afterwards.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_families import CALIB, FAMILIES

from effref.lowrank import losparse_compress_model, svd_compress_model
from effref.pruning import PruneConfig, magnitude_prune_model, sparsegpt_prune_model, wanda_prune_model
from effref.pruning.llm_pruner import LLMPrunerConfig, llm_prune
from effref.quantization import (
    AWQConfig,
    GPTQConfig,
    QuantConfig,
    SmoothQuantConfig,
    WAQuantConfig,
    awq_model,
    bitnet_model,
    gptq_model,
    llm_int8_model,
    os_plus_model,
    rtn_model,
    smoothquant_model,
    spqr_model,
    zeroquant_model,
)
from effref.quantization.quip import QuIPConfig, quip_model
from effref.quantization.spqr import SpQRConfig

Q4 = QuantConfig(4, group_size=32)
CALLS = {
    "rtn": lambda m: rtn_model(m, Q4, progress=False),
    "gptq": lambda m: gptq_model(m, CALIB, GPTQConfig(Q4), progress=False),
    "awq": lambda m: awq_model(m, CALIB, AWQConfig(Q4), progress=False),
    "quip": lambda m: quip_model(m, CALIB, QuIPConfig(GPTQConfig(Q4)), progress=False),
    "spqr": lambda m: spqr_model(m, CALIB, SpQRConfig(), progress=False),
    "llm.int8": lambda m: llm_int8_model(m, CALIB, progress=False),
    "zeroquant": lambda m: zeroquant_model(m, WAQuantConfig(group_size=32), progress=False),
    "smoothquant": lambda m: smoothquant_model(m, CALIB, SmoothQuantConfig(), progress=False),
    "os+": lambda m: os_plus_model(m, CALIB, progress=False),
    "bitnet": lambda m: bitnet_model(m, progress=False),
    "magnitude": lambda m: magnitude_prune_model(m, PruneConfig(0.5), progress=False),
    "wanda": lambda m: wanda_prune_model(m, CALIB, PruneConfig(0.5), progress=False),
    "sparsegpt": lambda m: sparsegpt_prune_model(m, CALIB, PruneConfig(0.5), progress=False),
    "llm-pruner": lambda m: llm_prune(m, CALIB[:2], LLMPrunerConfig(ratio=0.25), progress=False),
    "svd": lambda m: svd_compress_model(m, 0.5, progress=False),
    "losparse": lambda m: losparse_compress_model(m, 0.5, 0.05, progress=False),
}


def _snapshot(model):
    return copy.deepcopy(model.state_dict()), [(n, type(m)) for n, m in model.named_modules()]


def _same(model, snapshot) -> bool:
    state, types = snapshot
    now = model.state_dict()
    return (state.keys() == now.keys() and all(torch.equal(state[k], now[k]) or (state[k].isnan() == now[k].isnan()).all()
                                               and torch.equal(state[k].nan_to_num(), now[k].nan_to_num()) for k in state)
            and types == [(n, type(m)) for n, m in model.named_modules()])


@pytest.mark.parametrize("call", CALLS)
def test_a_refused_last_layer_leaves_the_model_as_it_was(call):
    torch.manual_seed(0)
    model = FAMILIES["llama"]().eval()
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight[0, 0] = float("nan")  # a broken checkpoint, found late
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj.*(nan|NaN|finite)|(nan|NaN|finite).*layers\.1"):
        CALLS[call](model)
    assert _same(model, snapshot)
