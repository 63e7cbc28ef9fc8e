"""The calibration walk against hooks on a plain forward pass; the inverse-Hessian factor against torch.inverse."""

import pytest
import torch
from torch import nn

from effref.compression.calibration import collect_input_stats, walk_linears
from effref.compression.hessian import damped_hessian, inverse_hessian_cholesky
from effref.models import load_model
from effref.models.llama import Llama


def _models():
    hf = load_model("tiny-llama", seed=1).model
    return {"hf": hf, "effref": Llama.from_hf(hf)}


def _layers_differ(family: str) -> nn.Module:
    """Families whose blocks are not all called alike: Gemma 2 alternates sliding-window layers (one RoPE base,
    a window mask) with global ones; Mistral's window mask, with a window shorter than the sequence."""
    import transformers

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2)
    torch.manual_seed(0)
    if family == "gemma2":
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**common, head_dim=16, sliding_window=8)).eval()
    return transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=8)).eval()


def _inputs_by_hooks(model: nn.Module, batches: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every block linear's input rows (n, C), captured during one ordinary forward pass."""
    rows: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and "lm_head" not in name:
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: rows.setdefault(name, []).append(inp[0].reshape(-1, inp[0].shape[-1]))))
    with torch.no_grad():
        model(batches)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in rows.items()}


@pytest.mark.parametrize("impl", ["hf", "effref", "gemma2", "mistral-window"])
def test_statistics_equal_those_of_the_inputs_seen_in_a_plain_forward(impl):
    model = _models()[impl] if impl in ("hf", "effref") else _layers_differ(impl.split("-")[0])
    batches = torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(0))
    stats = collect_input_stats(model, batches, needs=("hessian", "sq_mean", "abs_max", "abs_mean", "min", "max"),
                                batch_size=2, progress=False)
    inputs = _inputs_by_hooks(model, batches)
    assert set(stats) == set(inputs)
    for name, X in inputs.items():
        s = stats[name]
        assert s.n_tokens == 5 * 24
        torch.testing.assert_close(s.hessian, X.T @ X / len(X), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s.sq_mean, X.pow(2).mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s.abs_max, X.abs().amax(0))
        torch.testing.assert_close(s.abs_mean, X.abs().mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s.min, X.amin(0))
        torch.testing.assert_close(s.max, X.amax(0))
    q = next(n for n in stats if n.endswith("q_proj"))
    assert stats[q] is stats[q.replace("q_proj", "k_proj")]  # linears reading one tensor share statistics


def test_sequential_walk_calibrates_each_block_on_the_modified_model():
    model = _models()["hf"]
    batches = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    seen = {}

    def halve(name, linear, stats):
        seen[name] = stats.hessian.clone()
        linear.weight.data *= 0.5  # changes what later blocks receive

    walk_linears(model, halve, batches, needs=("hessian",), progress=False)
    inputs = _inputs_by_hooks(model, batches)  # the fully modified model
    last_block = [n for n in seen if ".1." in n]
    for name in last_block:  # block 1's inputs come from the modified block 0 (and its own inputs are unchanged)
        if name.endswith(("q_proj", "k_proj", "v_proj")):
            X = inputs[name]
            torch.testing.assert_close(seen[name], X.T @ X / len(X), rtol=1e-4, atol=1e-6)


def test_replacement_modules_are_installed_and_no_forward_runs_without_needs():
    model = _models()["effref"]
    walk_linears(model, lambda name, lin, s: nn.Identity() if name.endswith("o_proj") else None, progress=False)
    assert all(isinstance(b.attn.o_proj, nn.Identity) for b in model.blocks)


def test_inverse_hessian_cholesky_factors_the_damped_inverse():
    torch.manual_seed(0)
    X = torch.randn(50, 6, dtype=torch.float64)
    X[:, 2] = 0  # a dead input
    H = X.T @ X / 50
    U, dead = inverse_hessian_cholesky(H, damp=0.05)
    ref = H.clone()
    ref[2, 2] = 1.0
    ref += 0.05 * torch.diagonal(ref).mean() * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(ref))
    assert torch.equal(dead, torch.tensor([False, False, True, False, False, False]))
    assert torch.equal(U, torch.triu(U))


@pytest.mark.parametrize("kwargs, message", [
    ({"needs": ("hessians",)}, "not known statistics"),
    ({"needs": ("hessian",)}, "calib_batches=None"),
    ({"needs": ("hessian",), "calib_batches": torch.rand(2, 4)}, "tensor of token ids"),
    ({"needs": ("hessian",), "calib_batches": torch.zeros(0, 4, dtype=torch.long)}, r"shape \(0, 4\) holds no tokens"),
    ({"needs": ("hessian",), "calib_batches": torch.zeros(2, 4, dtype=torch.long), "batch_size": 0}, "batch_size=0"),
    ({"block_ids": [5]}, "out of range"),
    ({"target": lambda name, m: False}, "selected no nn.Linear"),
])
def test_walk_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        walk_linears(_models()["hf"], lambda *a: None, progress=False, **kwargs)


@pytest.mark.parametrize("H, damp, message", [
    (torch.eye(3)[:2], 0.01, "square"), (torch.eye(3), 1.5, "damp=1.5"), (-torch.eye(3), 0.0, "positive definite")])
def test_hessian_helpers_reject_bad_arguments(H, damp, message):
    with pytest.raises(ValueError, match=message):
        inverse_hessian_cholesky(H, damp) if "definite" in message else damped_hessian(H, damp)
