"""MEGABYTE is an autoregressive byte model: what it predicts for byte t depends on bytes < t only, and through
both of its paths (earlier bytes of the patch, earlier patches); its attention cost is the paper's formula."""

import pytest
import torch

from effref.alternatives import Megabyte, MegabyteConfig, attention_pairs

P = 4


def model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = MegabyteConfig(**{"patch_size": P, "d_global": 32, "d_local": 16, "n_global_layers": 2,
                            "n_local_layers": 1, "n_heads": 2, "max_patches": 8, **overrides})
    return Megabyte(cfg).eval()


def bytes_(n, seed=1):
    return torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("t", [0, 1, 3, 4, 6, 9])
def test_byte_t_changes_no_earlier_prediction_and_reaches_later_ones(t):
    net, ids = model(), bytes_(16)
    changed = ids.clone()
    changed[:, t] = (changed[:, t] + 1) % 256
    before, after = net(ids), net(changed)
    torch.testing.assert_close(after[:, :t + 1], before[:, :t + 1], rtol=0, atol=0)  # logits at ≤ t predict ≤ t
    moved = (after - before).abs().amax(dim=(0, 2))  # (T,)
    same_patch = range(t + 1, (t // P + 1) * P)  # the local path
    later_patches = range((t // P + 1) * P, 16)  # the global path
    assert all(moved[s] > 1e-6 for s in same_patch) and all(moved[s] > 1e-6 for s in later_patches)


@torch.no_grad()
def test_prefixes_give_the_full_sequence_logits_incremental_equals_parallel():
    net, ids = model(), bytes_(13)  # 13 bytes: the last patch is padded
    full = net(ids)
    assert full.shape == (2, 13, 256)
    for t in range(13):
        torch.testing.assert_close(net(ids[:, :t + 1])[:, t], full[:, t], rtol=1e-5, atol=1e-5)


def test_a_few_steps_learn_a_repeated_text():
    net = model(max_patches=16).train()
    ids = torch.tensor([list(b"the cat sat on the mat. " * 2)])  # (1, 48)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(net(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@torch.no_grad()
def test_save_load_is_exact(tmp_path):
    net, ids = model(), bytes_(12)
    torch.save(net.state_dict(), tmp_path / "megabyte.pt")
    again = model(seed=5)
    again.load_state_dict(torch.load(tmp_path / "megabyte.pt"))
    torch.testing.assert_close(again(ids), net(ids), rtol=0, atol=0)


@pytest.mark.parametrize("length, patch", [(1, 1), (16, 4), (17, 4), (64, 8), (10, 16)])
def test_attention_pairs_count_the_masks(length, patch):
    K = -(-length // patch)
    causal = lambda n: int(torch.ones(n, n).tril().sum())
    assert attention_pairs(length, patch) == (causal(K) + K * causal(patch), causal(length))


def test_patches_make_attention_cheaper_at_length():
    megabyte, dense = attention_pairs(8192, 8)
    assert megabyte < dense / 50


@pytest.mark.parametrize("overrides, message", [
    ({"patch_size": 0}, "patch_size"), ({"d_global": 30}, "multiple of patch_size"),
    ({"n_heads": 3}, "n_heads"), ({"max_patches": -1}, "max_patches")])
def test_bad_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        model(**overrides)


def test_bad_inputs_are_refused():
    net = model()
    with pytest.raises(ValueError, match="max_patches"):
        net(bytes_(8 * P + 1))
    with pytest.raises(ValueError, match="vocabulary"):
        net(torch.tensor([[3, 256]]))
    with pytest.raises(ValueError, match="length"):
        attention_pairs(0, 4)
