"""Every model-level compression call is all or nothing: when one layer is refused, the model is exactly as it was.

The defect sits in the *last* block, so that a call which changed layers as it went would already have rewritten
the first block when it meets it: its parameters, buffers and module types are compared afterwards.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_families import COMPRESSION_CALLS, FAMILIES

CALLS = COMPRESSION_CALLS


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
