"""LoraHub: composition by hand, and the gradient-free search recovers a module hidden in the pool."""

import copy

import pytest
import torch

from effref.models import load_model
from effref.peft.lora import LoraConfig, apply_lora, load_lora_state_dict, lora_state_dict
from effref.peft.lorahub import LoraHubConfig, compose_lora, lorahub_search


def tiny():
    return load_model("tiny-llama", seed=0).model


def ids():
    return torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(0))


def random_modules(model, n):
    mods = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        mods.append({k: torch.randn(v.shape, generator=g) * 0.3 for k, v in lora_state_dict(model).items()})
    return mods


def test_compose_is_the_weighted_sum_of_a_and_b_separately():
    model = apply_lora(tiny(), LoraConfig(r=2))
    mods = random_modules(model, 3)
    out = compose_lora(mods, [0.5, -1.0, 2.0])
    for k in out:
        torch.testing.assert_close(out[k], 0.5 * mods[0][k] - mods[1][k] + 2.0 * mods[2][k])
    load_lora_state_dict(model, compose_lora(mods, [1.0, 0.0, 0.0]))
    layer = model.model.layers[0].self_attn.q_proj
    expected = layer.scaling * mods[0]["model.layers.0.self_attn.q_proj.lora_B.weight"] @ \
        mods[0]["model.layers.0.self_attn.q_proj.lora_A.weight"]
    torch.testing.assert_close(layer.delta_weight(), expected)


def test_search_finds_the_module_that_solves_the_task():
    model = apply_lora(tiny(), LoraConfig(r=2))
    mods = random_modules(model, 3)
    target_model = copy.deepcopy(model)
    load_lora_state_dict(target_model, mods[1])  # the "new task" is exactly what module 1 does
    x = ids()
    with torch.no_grad():
        target = target_model(x).logits

    def loss(m):
        return float(((m(x).logits - target) ** 2).mean())

    load_lora_state_dict(model, compose_lora(mods, [1 / 3] * 3))
    uniform = loss(model)
    result = lorahub_search(model, mods, loss, LoraHubConfig(max_evals=150, l1=0.0, bounds=(-2, 2)))
    assert result.objective < 0.05 * uniform
    w = result.weights
    assert abs(abs(w[1]) - 1) < 0.1 and abs(w[0]) < 0.1 and abs(w[2]) < 0.1, w  # (±1: (−A)(−B) = AB)
    assert len(result.history) <= 150 + 1
    assert loss(model) == pytest.approx(result.objective)  # the best weights are loaded


@pytest.mark.parametrize("kwargs, match", [
    ({"max_evals": 0}, "max_evals=0"), ({"l1": -1.0}, "l1=-1.0"), ({"bounds": (1.0, -1.0)}, "low < high"),
])
def test_lorahub_config_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraHubConfig(**kwargs)


def test_compose_rejects_mismatched_modules():
    model = apply_lora(tiny(), LoraConfig(r=2))
    mods = random_modules(model, 2)
    with pytest.raises(ValueError, match="one weight per module"):
        compose_lora(mods, [1.0])
    other = {k: v for k, v in list(mods[1].items())[:-1]}
    with pytest.raises(ValueError, match="other keys or shapes"):
        compose_lora([mods[0], other], [1.0, 1.0])
    with pytest.raises(ValueError, match="no LoRA layers|apply"):
        lorahub_search(tiny(), mods, lambda m: 0.0)
