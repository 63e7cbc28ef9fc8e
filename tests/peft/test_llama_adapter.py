"""LLaMA-Adapter: unchanged at init, brute-force gated prompt attention, ours vs transformers, bad inputs."""

import copy
import math

import pytest
import torch

from effref.eval import parameter_count
from effref.models import load_model
from effref.peft import load_trainable, trainable_state_dict
from effref.peft.llama_adapter import AdaptedAttention, LlamaAdapterConfig, apply_llama_adapter


def tiny(impl="hf"):
    return load_model("tiny-llama", seed=0, impl=impl).model


def ids():
    return torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))


def open_gates(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AdaptedAttention):
                m.gate.fill_(0.7)


@pytest.mark.parametrize("impl", ["hf", "effref"])
def test_model_is_unchanged_at_initialisation(impl):
    base = tiny(impl)
    model = apply_llama_adapter(copy.deepcopy(base), LlamaAdapterConfig(n_prompt=4, n_layers=1))
    out, ref = model(ids()), base(ids())
    assert torch.equal(getattr(out, "logits", out), getattr(ref, "logits", ref))
    open_gates(model)
    out = model(ids())
    assert not torch.allclose(getattr(out, "logits", out), getattr(ref, "logits", ref), atol=1e-4)


def test_only_prompts_and_gates_of_the_top_layers_train():
    model = apply_llama_adapter(tiny(), LlamaAdapterConfig(n_prompt=4, n_layers=1))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"model.layers.1.self_attn.prompt", "model.layers.1.self_attn.gate"}
    assert parameter_count(model, trainable_only=True) == 4 * 64 + 4


def test_prompt_term_matches_a_head_by_head_computation():
    model = apply_llama_adapter(tiny("effref"), LlamaAdapterConfig(n_prompt=3, n_layers=1))
    layer = model.blocks[1].attn
    open_gates(model)
    x = torch.randn(1, 5, 64)
    cos, sin = model.rope_cos[:5], model.rope_sin[:5]
    got = layer.prompt_term(x, cos, sin)
    a = layer.attn
    q = a.q_proj(x)[0].view(5, 4, 16)  # (T, H, dh)
    k = a.k_proj(layer.prompt).view(3, 2, 16)  # (K, n_kv, dh)
    v = a.v_proj(layer.prompt).view(3, 2, 16)
    heads = []
    for h in range(4):
        qh = q[:, h]  # (T, dh), rotated by position
        qh = qh * cos + torch.cat([-qh[:, 8:], qh[:, :8]], -1) * sin
        p = torch.softmax(qh @ k[:, h // 2].T / math.sqrt(16), -1)  # (T, K)
        heads.append(math.tanh(0.7) * p @ v[:, h // 2])
    expected = a.o_proj(torch.cat(heads, -1))[None]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_our_llama_and_transformers_agree_with_the_same_adapter():
    cfg = LlamaAdapterConfig(n_prompt=3, n_layers=2)
    hf, ours = apply_llama_adapter(tiny(), cfg), apply_llama_adapter(tiny("effref"), cfg)
    open_gates(hf)
    state = {k.replace("model.layers", "blocks").replace("self_attn", "attn"): v
             for k, v in trainable_state_dict(hf).items()}
    load_trainable(ours, state)
    torch.testing.assert_close(ours(ids()), hf(ids()).logits, rtol=1e-4, atol=1e-4)


def test_gates_get_gradients_at_zero():
    model = apply_llama_adapter(tiny(), LlamaAdapterConfig(n_prompt=3, n_layers=2))
    model(ids(), labels=ids()).loss.backward()
    gates = [m.gate.grad for m in model.modules() if isinstance(m, AdaptedAttention)]
    assert all(g is not None and g.abs().sum() > 0 for g in gates)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"n_prompt": 0}, ValueError, "n_prompt=0"),
    ({"n_layers": 3}, ValueError, "n_layers=3 exceeds"),
])
def test_llama_adapter_rejects_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        apply_llama_adapter(tiny(), LlamaAdapterConfig(**kwargs))


def test_llama_adapter_needs_a_llama():
    with pytest.raises(TypeError, match="LLaMA-like"):
        apply_llama_adapter(torch.nn.Linear(2, 2), LlamaAdapterConfig())
