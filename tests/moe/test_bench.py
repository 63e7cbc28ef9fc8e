"""The chapter's bench: twins of equal active parameters, a training loop that lowers the loss and calls back."""

import pytest
import torch

from effref.moe.bench import eval_loss, tiny_pair, train_lm


def test_twins_differ_only_in_the_mlps():
    moe, dense = tiny_pair(d_model=32, d_ff=16, n_experts=4, top_k=2, n_layers=2, max_seq_len=32)
    assert moe.active_parameters() == dense.num_parameters() + 2 * 4 * 32  # two routers of E × D
    assert moe.num_parameters() - dense.num_parameters() == 2 * (2 * 3 * 32 * 16 + 4 * 32)
    shared = [n for n in dense.state_dict() if ".mlp." not in n]
    assert all(torch.equal(moe.state_dict()[n], dense.state_dict()[n]) for n in shared)  # same start but the MLPs


def test_training_lowers_the_loss_on_a_repeated_text_and_records_loads():
    ids = torch.tensor(list(b"the cat sat on the mat. " * 200), dtype=torch.long)
    moe, dense = tiny_pair(d_model=32, d_ff=32, n_experts=4, top_k=1, max_seq_len=32)
    seen = []
    before = eval_loss(moe, ids, seq_len=16, n_windows=4)
    log = train_lm(moe, ids, 40, batch_size=8, seq_len=16, lr=1e-2, progress=False, after_step=seen.append)
    assert eval_loss(moe, ids, seq_len=16, n_windows=4) < 0.5 * before
    assert seen == list(range(40)) and log.load_history().shape == (40, 2, 4)
    assert (log.load_history().sum(-1) == 8 * 16).all()  # top-1, no capacity: every token once per layer
    assert train_lm(dense, ids, 2, batch_size=2, seq_len=8, progress=False).load_history().numel() == 0


@pytest.mark.parametrize("kwargs, message", [({"steps": 0}, "steps=0"), ({"seq_len": 10_000}, "seq_len=10000")])
def test_bad_training_arguments_are_refused(kwargs, message):
    moe, _ = tiny_pair(d_model=32, d_ff=16, max_seq_len=32)
    with pytest.raises(ValueError, match=message):
        train_lm(moe, torch.zeros(100, dtype=torch.long), **({"steps": 1} | kwargs))


def test_a_pyramid_records_each_layers_loads():
    from effref.moe import MixtralConfig
    from effref.moe.pr_moe import pr_moe

    model = pr_moe(MixtralConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=16,
                                 max_seq_len=32), (2, 4))
    log = train_lm(model, torch.randint(0, 256, (500,)), 3, batch_size=2, seq_len=8, progress=False)
    assert log.load_history(layer=0).shape == (3, 2) and log.load_history(layer=1).shape == (3, 4)
    with pytest.raises(ValueError, match="load_history\\(layer=i\\)"):
        log.load_history()
