"""Prefix tuning / P-Tuning v2 vs Hugging Face peft; our Llama vs transformers; a brute-force prefix check."""

import copy

import pytest
import torch

from effref.eval import parameter_count
from effref.models import load_model
from effref.peft import load_trainable, trainable_state_dict
from effref.peft.prefix_tuning import PrefixConfig, apply_prefix_tuning, apply_ptuning_v2

peft = pytest.importorskip("peft")


def tiny(impl="hf"):
    return load_model("tiny-llama", seed=0, impl=impl).model


def ids():
    return torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("reparameterize", [True, False])
def test_prefix_tuning_matches_peft_outputs_and_counts(reparameterize):
    base = tiny()
    ours = apply_prefix_tuning(copy.deepcopy(base), PrefixConfig(n_virtual=4, reparameterize=reparameterize,
                                                                  hidden=24))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=reparameterize, encoder_hidden_size=24))
    theirs.prompt_encoder["default"].load_state_dict(ours.encoder.state_dict())
    torch.testing.assert_close(ours(ids()), theirs(input_ids=ids()).logits, rtol=1e-5, atol=1e-5)
    assert parameter_count(ours, trainable_only=True) == theirs.get_nb_trainable_parameters()[0]


def test_prefix_equals_the_cache_of_real_tokens():
    """A prefix made of the keys/values that real tokens leave in the cache reproduces those tokens' effect."""
    base = tiny()
    context = torch.tensor([[5, 6, 7]]).expand(2, -1)
    out = base(context, use_cache=True)
    model = apply_ptuning_v2(copy.deepcopy(base), n_virtual=3)
    layers = out.past_key_values.layers
    flat = torch.stack([t[0] for layer in layers for t in (layer.keys, layer.values)])  # (2L, n_kv, 3, dh)
    with torch.no_grad():
        model.encoder.embedding.weight.copy_(flat.permute(2, 0, 1, 3).reshape(3, -1))
    expected = base(torch.cat([context, ids()], dim=1)).logits[:, 3:]
    torch.testing.assert_close(model(ids()), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reparameterize", [True, False])
def test_our_llama_and_transformers_agree_under_the_same_prefix(reparameterize):
    cfg = PrefixConfig(n_virtual=3, reparameterize=reparameterize)
    hf = apply_prefix_tuning(tiny(), cfg)
    ours = apply_prefix_tuning(tiny("effref"), cfg)
    load_trainable(ours, trainable_state_dict(hf))
    torch.testing.assert_close(ours(ids()), hf(ids()), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours(ids(), logits_to_keep=1), hf(ids(), logits_to_keep=1), rtol=1e-4, atol=1e-4)


def test_gradients_reach_the_prefix_and_not_the_model():
    model = apply_prefix_tuning(tiny(), PrefixConfig(n_virtual=3))
    model(ids()).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert all(p.grad is None for p in model.model.parameters())


@pytest.mark.parametrize("kwargs, match", [({"n_virtual": 0}, "n_virtual=0"), ({"hidden": 0}, "hidden=0")])
def test_prefix_config_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrefixConfig(**kwargs)


def test_prefix_needs_an_attention_model():
    with pytest.raises(TypeError, match="attention shape"):
        apply_prefix_tuning(torch.nn.Linear(2, 2), PrefixConfig())


def test_prefix_and_prompt_wrappers_accept_input_embeddings():
    from effref.peft.prompt_tuning import PromptTuningConfig, apply_prompt_tuning

    base = tiny()
    embeds = base.get_input_embeddings()(ids())
    for model in (apply_prefix_tuning(copy.deepcopy(base), PrefixConfig(n_virtual=2)),
                  apply_prompt_tuning(copy.deepcopy(base), PromptTuningConfig(n_virtual=2))):
        torch.testing.assert_close(model(inputs_embeds=embeds), model(ids()))
