"""PoSE: the skip-wise position ids keep the paper's constraints and cover the target context; a batch holds the
text at those positions; training through them changes only what it should."""

from __future__ import annotations

import pytest
import torch

from effref.longcontext.pose import PoSEConfig, pose_batch, pose_position_ids, train_context
from effref.longcontext.positions import at_positions

DRAWS = 2000


@pytest.mark.parametrize("window, target, chunks", [(16, 128, 2), (16, 128, 3), (32, 32, 2), (8, 1000, 8)])
def test_ids_increase_in_n_consecutive_runs_inside_the_target(window, target, chunks):
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        ids = pose_position_ids(PoSEConfig(window, target, chunks), g)
        assert ids.shape == (window,) and ids.dtype == torch.long
        steps = ids[1:] - ids[:-1]
        assert (steps >= 1).all()  # strictly increasing: chunks never overlap
        assert (steps > 1).sum() <= chunks - 1  # at most one skip between chunks
        assert ids[0] >= 0 and ids[-1] <= target - 1  # every id inside the target context
    if window == target:  # nothing to skip: PoSE is plain training
        assert torch.equal(ids, torch.arange(window))


def test_draws_cover_every_relative_distance_of_the_target():
    # PoSE's promise: a window of 16 teaches every distance up to 127. With 2 chunks, the longest distance 127
    # needs u_0 = 0 and u_1 = 112 (chance ~ 1/113²·(…)), so we count distances between any two ids of a draw:
    # distance δ is seen when some pair of ids lies δ apart. 2000 draws with a fixed seed; a miss of any
    # distance below 120 has a chance far below 1e-6 per distance (each draw gives it with probability > 1%).
    cfg, g = PoSEConfig(16, 128, 2), torch.Generator().manual_seed(0)
    seen = torch.zeros(128, dtype=torch.bool)
    max_id = 0
    for _ in range(DRAWS):
        ids = pose_position_ids(cfg, g)
        seen[(ids[:, None] - ids[None, :]).clamp(min=0).flatten()] = True
        max_id = max(max_id, int(ids[-1]))
    assert seen[:120].all() and max_id == 127
    plain = torch.arange(16)  # a plain 16-token window only ever sees distances < 16
    assert int((plain[:, None] - plain[None, :]).max()) == 15


def test_batch_holds_the_text_at_its_positions_and_labels_its_successors():
    text = torch.arange(1000) * 3  # token at index a is 3a: a row reveals where in the text it was read
    cfg = PoSEConfig(12, 100, 3)
    inputs, labels, ids = pose_batch(text, 4, cfg, torch.Generator().manual_seed(3))
    assert inputs.shape == labels.shape == (4, 12) and ids.shape == (12,)
    where = inputs // 3  # (4, 12): the text index of every input token
    starts = where - ids  # one start a_b per row: the tokens sit at a_b + id
    assert (starts == starts[:, :1]).all() and len(set(starts[:, 0].tolist())) > 1
    assert torch.equal(labels, text[where + 1])  # each label is the next token of the text


def test_at_positions_with_the_natural_ids_is_the_plain_model_and_shifts_change_nothing(make_llama, make_ids):
    model = make_llama()
    x = make_ids(20)
    with torch.no_grad():
        plain = model(x)
        with at_positions(model, torch.arange(20)):
            same = model(x)
        with at_positions(model, torch.arange(20) + 30):  # RoPE is relative: a common shift changes nothing
            shifted = model(x)
        with at_positions(model, torch.cat([torch.arange(10), torch.arange(10) + 40])):  # a skip does
            skipped = model(x)
        after = model(x)
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
    torch.testing.assert_close(shifted, plain, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(skipped[:, :10], plain[:, :10], rtol=1e-4, atol=1e-3)  # causal: before the skip
    assert (skipped[:, 10:] - plain[:, 10:]).abs().max() > 1e-2
    torch.testing.assert_close(after, plain, rtol=0, atol=0)  # the tables are restored
    assert model.cfg.max_seq_len == 64


def test_pose_training_learns_from_short_windows(make_llama):
    text = torch.arange(4000) % 16  # a periodic text: the next token is always the previous one + 1 (mod 16)
    torch.manual_seed(0)
    model = make_llama(vocab_size=16)
    with torch.no_grad():
        for p in model.parameters():
            p.div_(10.0)  # back to the usual initial scale for training
    losses = train_context(model, text, steps=40, window=8, batch_size=8, lr=1e-2, target_len=64,
                           progress=False)
    assert losses[-1] < 0.3 * losses[0] and not model.training


@pytest.mark.parametrize("kwargs, message", [
    ({"window": 0, "target_len": 8}, "window=0 must be a positive integer"),
    ({"window": 16, "target_len": 8}, "target_len=8 < window=16"),
    ({"window": 4, "target_len": 8, "n_chunks": 5}, "n_chunks=5 > window=4"),
    ({"window": 4, "target_len": -1}, "target_len=-1 must be a positive integer"),
])
def test_bad_configs_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PoSEConfig(**kwargs)


def test_bad_training_arguments_are_refused_by_name(make_llama):
    model, text = make_llama(), torch.arange(500) % 64
    with pytest.raises(ValueError, match="within max_seq_len=64"):
        train_context(model, text, steps=1, window=8, target_len=128, progress=False)
    with pytest.raises(ValueError, match="tokens has 20 ids"):
        train_context(model, text[:20], steps=1, window=32, progress=False)
    with pytest.raises(ValueError, match="position_ids run from 0 to 70"):
        with at_positions(model, torch.arange(71)):
            pass
