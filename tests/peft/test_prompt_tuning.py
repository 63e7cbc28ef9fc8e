"""Prompt tuning vs Hugging Face peft; P-Tuning's encoder; our Llama vs transformers; bad inputs."""

import copy

import pytest
import torch

from effref.eval import parameter_count
from effref.finetune import last_logits
from effref.models import load_model
from effref.peft import load_trainable, trainable_state_dict
from effref.peft.prompt_tuning import PromptTuningConfig, SoftPromptModel, apply_p_tuning, apply_prompt_tuning

peft = pytest.importorskip("peft")


def tiny(impl="hf"):
    return load_model("tiny-llama", seed=0, impl=impl).model


def ids():
    return torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))


def test_prompt_tuning_matches_peft_outputs_and_counts():
    base = tiny()
    ours = apply_prompt_tuning(copy.deepcopy(base), PromptTuningConfig(n_virtual=5))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                              num_virtual_tokens=5))
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(ours.prompt_embedding)
    torch.testing.assert_close(ours(ids()), theirs(input_ids=ids()).logits[:, 5:], rtol=1e-5, atol=1e-5)
    assert parameter_count(ours, trainable_only=True) == theirs.get_nb_trainable_parameters()[0] == 5 * 64


def test_soft_prompt_changes_the_output_like_real_tokens_do():
    """A prompt equal to the embeddings of real tokens gives the model's outputs for those tokens + input."""
    base = tiny()
    prefix = torch.tensor([7, 42, 99])
    model = apply_prompt_tuning(copy.deepcopy(base), PromptTuningConfig(n_virtual=3, init="text",
                                                                        init_ids=tuple(prefix.tolist())))
    full = base(torch.cat([prefix.expand(2, -1), ids()], dim=1)).logits[:, 3:]
    torch.testing.assert_close(model(ids()), full)
    torch.testing.assert_close(last_logits(model, ids()), full[:, -1])


def test_our_llama_and_transformers_agree_under_the_same_soft_prompt():
    hf = apply_prompt_tuning(tiny(), PromptTuningConfig(n_virtual=4, init="random"))
    ours = apply_prompt_tuning(tiny("effref"), PromptTuningConfig(n_virtual=4, init="random"))
    load_trainable(ours, trainable_state_dict(hf))
    torch.testing.assert_close(ours(ids()), hf(ids()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_p_tuning_trains_its_encoder_and_not_the_model(encoder):
    model = apply_p_tuning(tiny(), n_virtual=4, encoder=encoder, encoder_hidden=32)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("encoder.") for n in trainable)
    assert model.prompt().shape == (4, 64)
    loss = model(ids()).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    assert all(p.grad is None for p in model.model.parameters())


@pytest.mark.parametrize("kwargs, match", [
    ({"n_virtual": 0}, "n_virtual=0"),
    ({"init": "zeros"}, "init='zeros'"),
    ({"init": "text"}, "needs init_ids"),
    ({"encoder": "gru"}, "encoder='gru'"),
])
def test_prompt_tuning_config_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptTuningConfig(**kwargs)


def test_soft_prompt_needs_a_language_model():
    with pytest.raises(TypeError, match="input embeddings"):
        SoftPromptModel(torch.nn.Linear(3, 3), PromptTuningConfig())


def test_init_prompt_is_used_and_checked():
    init = torch.randn(3, 64)
    model = apply_prompt_tuning(tiny(), PromptTuningConfig(n_virtual=3), init_prompt=init)
    assert torch.equal(model.prompt().detach(), init)
    with pytest.raises(ValueError, match="expected"):
        apply_prompt_tuning(tiny(), PromptTuningConfig(n_virtual=4), init_prompt=init)
