"""Our Mixtral against transformers' MixtralForCausalLM and MixtralSparseMoeBlock on the same weights."""

import pytest
import torch

from effref.models.llama import RopeScaling
from effref.moe import (
    Experts,
    Mixtral,
    MixtralConfig,
    MoELayer,
    TopKRouter,
    load_mixtral,
    moe_layers,
    save_mixtral,
)
from effref.moe.switch import load_balancing_loss

transformers = pytest.importorskip("transformers")
modeling_mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")


def hf_config(n_experts, top_k, layers=2, tie=False):
    return transformers.MixtralConfig(
        vocab_size=101, hidden_size=32, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=n_experts, num_experts_per_tok=top_k, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, router_aux_loss_coef=0.02)


def randomise(module, seed=0, scale=0.3):
    """Weights large enough that routing and outputs differ visibly between tokens (init std 0.02 is near-silent)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + scale * torch.randn(p.shape, generator=g))
    return module


def ids(seed=0, shape=(2, 13), vocab=101):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_experts, top_k", [(1, 1), (4, 1), (4, 2), (8, 2), (6, 3), (5, 5)])
def test_logits_equal_transformers(n_experts, top_k):
    hf = randomise(transformers.MixtralForCausalLM(hf_config(n_experts, top_k))).eval()
    ours = Mixtral.from_hf(hf)
    x = ids()
    with torch.no_grad():
        theirs = hf(x).logits
        mine = ours(x)
    assert theirs.abs().max() > 1  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    chosen = [layer.routing.load() for layer in moe_layers(ours)]
    assert all(int(load.sum()) == x.numel() * top_k for load in chosen)  # dropless: every token, K experts


def test_tied_embeddings_load():
    hf = randomise(transformers.MixtralForCausalLM(hf_config(4, 2, tie=True))).eval()
    ours = Mixtral.from_hf(hf)
    assert ours.lm_head.weight.data_ptr() == ours.embed.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()), hf(ids()).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_experts, top_k", [(4, 2), (8, 1), (3, 3)])
def test_sparse_block_equals_transformers_block(n_experts, top_k):
    cfg = hf_config(n_experts, top_k)
    theirs = randomise(modeling_mixtral.MixtralSparseMoeBlock(cfg), seed=1).eval()
    router = TopKRouter(32, n_experts, top_k)
    experts = Experts(n_experts, 32, 24)
    with torch.no_grad():
        router.gate.weight.copy_(theirs.gate.weight)
        experts.gate.copy_(theirs.experts.gate_up_proj[:, :24])
        experts.up.copy_(theirs.experts.gate_up_proj[:, 24:])
        experts.down.copy_(theirs.experts.down_proj)
    ours = MoELayer(router, experts)
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x.clone()), rtol=1e-5, atol=1e-6)


def test_balancing_loss_equals_transformers_per_layer():
    hf = randomise(transformers.MixtralForCausalLM(hf_config(8, 2, layers=3))).eval()
    ours = Mixtral.from_hf(hf)
    x = ids(3, (4, 16))
    with torch.no_grad():
        out = hf(x, output_router_logits=True)
        ours(x)
    for layer, logits in zip(moe_layers(ours), out.router_logits):
        theirs = modeling_mixtral.load_balancing_loss_func((logits,), 8, 2)
        torch.testing.assert_close(load_balancing_loss(layer.routing.probs, layer.routing.expert.view(-1, 2)), theirs)
        torch.testing.assert_close(layer.routing.aux_loss, 0.02 * theirs)  # α = router_aux_loss_coef
    assert ours.aux_loss() > 0


@pytest.mark.parametrize("scaling", [RopeScaling(), RopeScaling("yarn", 2.0, original_len=32)])
def test_save_and_load_are_exact(tmp_path, scaling):
    model = randomise(Mixtral(MixtralConfig(vocab_size=101, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                            d_ff=24, n_experts=4, top_k=2, max_seq_len=64, tie_embeddings=True,
                                            rope_scaling=scaling)))
    size = save_mixtral(model, tmp_path / "m.safetensors")
    back = load_mixtral(tmp_path / "m.safetensors")
    assert size > 0 and back.cfg == model.cfg
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(model.eval()(ids()), back(ids()))


def test_generation_with_cache_equals_full_forward():
    model = randomise(Mixtral(MixtralConfig(vocab_size=101, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                            d_ff=24, n_experts=4, top_k=2, max_seq_len=64))).eval()
    out = model.generate(ids(shape=(1, 5)), max_new_tokens=6)
    with torch.no_grad():
        greedy = model(out[:, :-1]).argmax(-1)[:, 4:]
    assert torch.equal(greedy, out[:, 5:])


def test_active_parameters_count_k_of_e_experts():
    cfg = MixtralConfig(vocab_size=101, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24, n_experts=8,
                        top_k=2, max_seq_len=64)
    model = Mixtral(cfg)
    experts = sum(layer.experts.gate.numel() * 3 for layer in moe_layers(model))
    assert model.active_parameters() == model.num_parameters() - experts * 6 // 8


@pytest.mark.parametrize("kwargs, message", [
    ({"n_experts": 0}, "n_experts=0"),
    ({"n_experts": 4, "top_k": 5}, "top_k=5"),
    ({"n_experts": 4, "top_k": 0}, "top_k=0"),
])
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MixtralConfig(vocab_size=101, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=24, **kwargs)


def test_non_mixtral_models_are_refused():
    llama = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                                     num_attention_heads=4)
    with pytest.raises(ValueError, match="model_type='llama'"):
        MixtralConfig.from_hf(llama)
