"""Bad input to the low-rank entry points: each is refused before anything changes, with an error naming the
argument and the fix (one table for the subpackage)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_families import CALIB, FAMILIES

from effref.lowrank import losparse_compress_model, svd_compress_model, tt_compress_embedding

MODEL = FAMILIES["llama"]
LAST = "model.layers.1.mlp.down_proj"
BAD = [
    ("ratio 0", lambda m: svd_compress_model(m, 0.0), ValueError, r"ratio=0\.0 must be in \(0, 1\]"),
    ("ratio above 1", lambda m: svd_compress_model(m, 1.5), ValueError, r"ratio=1\.5 must be in \(0, 1\]"),
    ("a rank too large for the last layer", lambda m: svd_compress_model(m, 0.5, rank_of={LAST: 999}), ValueError,
     r"rank=999 must be an integer in \[1, min\(rows, cols\)\] = \[1, 64\]"),
    ("whitening without calibration", lambda m: svd_compress_model(m, 0.5, whiten=True), ValueError, r"calib"),
    ("float calibration", lambda m: svd_compress_model(m, 0.5, whiten=True, calib_batches=CALIB.float()), ValueError,
     r"calib_batches must be a \(n, T\) tensor of token ids"),
    ("sparse fraction above 1", lambda m: losparse_compress_model(m, 0.5, 1.5), ValueError,
     r"sparse_fraction=1\.5 must be in \[0, 1\]"),
    ("unknown structure", lambda m: losparse_compress_model(m, 0.5, 0.1, structure="row"), ValueError,
     r"structure='row' is not known"),
    ("TT factors that miss the width", lambda m: tt_compress_embedding(m, (4, 8), (2,)), ValueError,
     r"dims=\(4, 8\) must have >= 2 positive factors whose product is the embedding"),
    ("TT ranks of the wrong length", lambda m: tt_compress_embedding(m, (8, 8), (2, 2)), ValueError,
     r"ranks=\(2, 2\) must hold len\(dims\) - 1 = 1 values"),
]


@pytest.mark.parametrize("what, call, error, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_by_name_and_changes_nothing(what, call, error, message):
    torch.manual_seed(0)
    model = MODEL().eval()
    state, types = copy.deepcopy(model.state_dict()), [type(m) for m in model.modules()]
    with pytest.raises(error, match=message):
        call(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert types == [type(m) for m in model.modules()]
