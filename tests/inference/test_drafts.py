"""Layer-skipping drafts against a hand-written forward pass, and the least-squares lens against identities."""

from __future__ import annotations

import pytest
import torch

from effref.inference.drafts import fit_lens, fit_prefix_lenses, layer_skip_draft


@torch.no_grad()
def run_blocks_by_hand(model, ids: torch.Tensor, layers: list[int]) -> torch.Tensor:
    T = ids.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    x = model.embed(ids)
    for i in layers:
        x = model.blocks[i](x, cos, sin)
    return model.lm_head(model.norm(x))


@pytest.mark.parametrize("keep", [2, [0, 2], [1], [0, 1, 2]])
def test_draft_equals_running_its_blocks_by_hand(tiny_llama, random_ids, keep) -> None:
    model = tiny_llama(scale=1.0)
    ids = random_ids(2, 12)
    before = model(ids).detach()
    draft = layer_skip_draft(model, keep)
    layers = list(range(keep)) if isinstance(keep, int) else keep
    with torch.no_grad():
        torch.testing.assert_close(draft(ids), run_blocks_by_hand(model, ids, layers), rtol=1e-5, atol=1e-5)
        cache = draft.new_cache(2, 12)  # one cache layer per kept block
        stepwise = torch.cat([draft(ids[:, :5], cache), draft(ids[:, 5:], cache)], dim=1)
        torch.testing.assert_close(stepwise, draft(ids), rtol=1e-5, atol=1e-5)
        assert len(cache.k) == len(layers)
        assert torch.equal(model(ids), before) and len(model.blocks) == 3  # the target is untouched
    assert draft.num_parameters() < model.num_parameters() or layers == [0, 1, 2]


def test_lens_of_the_full_model_is_the_identity(tiny_llama, random_ids) -> None:
    model = tiny_llama(scale=1.0)
    lens = fit_lens(model, 3, random_ids(4, 40), ridge=0.0)
    torch.testing.assert_close(lens.weight, torch.eye(32), rtol=0, atol=1e-3)
    torch.testing.assert_close(lens.bias, torch.zeros(32), rtol=0, atol=1e-3)


def test_lens_beats_the_identity_on_its_calibration_data(tiny_llama, random_ids) -> None:
    model = tiny_llama(scale=1.0)
    ids = random_ids(4, 40)
    lens = fit_lens(model, 1, ids, ridge=1e-3)
    seen = {}
    hook = model.norm.register_forward_pre_hook(lambda m, args: seen.setdefault(len(seen), args[0]))
    with torch.no_grad():
        layer_skip_draft(model, 1)(ids)
        model(ids)
    hook.remove()
    early, final = seen[0], seen[1]
    with torch.no_grad():
        error = ((lens(early) - final) ** 2).mean()
        assert error < ((early - final) ** 2).mean()  # least squares beats every other affine map ...
        for seed in range(3):  # ... e.g. the identity, or the fitted map nudged in a random direction
            nudge = 1e-3 * torch.randn(32, 32, generator=torch.Generator().manual_seed(seed))
            assert error < ((early @ (lens.weight + nudge).T + lens.bias - final) ** 2).mean()
    with torch.no_grad():  # the lens sits in front of the final norm
        torch.testing.assert_close(layer_skip_draft(model, 1, lens)(ids), model.lm_head(model.norm(lens(early))))


def test_lenses_from_one_pass_equal_lenses_fitted_one_by_one(tiny_llama, random_ids) -> None:
    model, ids = tiny_llama(scale=1.0), random_ids(4, 40)
    together = fit_prefix_lenses(model, (1, 2), ids)
    for k in (1, 2):
        alone = fit_lens(model, k, ids)
        torch.testing.assert_close(together[k].weight, alone.weight)
        torch.testing.assert_close(together[k].bias, alone.bias)


@pytest.mark.parametrize("keep, message", [
    (0, "keep=0"), (4, "keep=4"), ([2, 1], "strictly increasing"), ([0, 0], "strictly increasing"),
    ([3], "keep=\\[3\\]"), ([], "keep=\\[\\]"),
])
def test_bad_keep_is_rejected(tiny_llama, keep, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        layer_skip_draft(tiny_llama(), keep)


def test_bad_lens_arguments_are_rejected(tiny_llama, random_ids) -> None:
    with pytest.raises(ValueError, match="more than d_model=32"):
        fit_lens(tiny_llama(), 1, random_ids(1, 30))
    with pytest.raises(ValueError, match="ridge=-1"):
        fit_lens(tiny_llama(), 1, random_ids(4, 40), ridge=-1)
