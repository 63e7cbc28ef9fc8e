"""LoRA / LoRA-FA against Hugging Face peft on the same tiny LLaMA, plus merge, save/load and bad inputs."""

import copy

import pytest
import torch
from torch import nn

from effref.eval import parameter_count
from effref.models import load_model
from effref.peft import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    apply_lora_fa,
    load_lora_state_dict,
    load_trainable,
    load_trainable_file,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    save_trainable,
    trainable_state_dict,
    unmerge_lora,
)

peft = pytest.importorskip("peft")
TARGETS = ("q_proj", "v_proj", "down_proj")


def tiny():
    return load_model("tiny-llama", seed=0).model


def randomise_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def ids(seed=0, shape=(2, 12)):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def lora_and_peft_twin():
    """(base, our LoRA on a copy with random B, peft's LoRA on another copy holding the same A and B, the number of
    adapted layers): the same adapter built twice, independently."""
    base = tiny()
    ours = apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    randomise_b(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS),
                                                                      lora_dropout=0.0))
    n = 0
    for name, module in theirs.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            mine = ours.get_submodule(name.removeprefix("base_model.model."))
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(mine.lora_A.weight)
                module.lora_B["default"].weight.copy_(mine.lora_B.weight)
            n += 1
    return base, ours, theirs, n


def test_lora_matches_peft_outputs_and_parameter_counts():
    base, ours, theirs, n = lora_and_peft_twin()
    assert n == 2 * 3  # 2 layers × 3 targets
    x = ids()
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours(x).logits, base(x).logits, atol=1e-4)  # the adapter does something
    assert parameter_count(ours, trainable_only=True) == theirs.get_nb_trainable_parameters()[0]


def test_lora_is_identity_at_init_and_only_adapters_train():
    base = tiny()
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=4))
    x = ids()
    torch.testing.assert_close(model(x).logits, base(x).logits)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_merge_then_unmerge_restores_base_weights_exactly_and_merge_preserves_outputs():
    model = apply_lora(tiny(), LoraConfig(r=4, target_modules=TARGETS))
    randomise_b(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = ids()
    out = model(x).logits
    merge_lora(model)
    assert all(m.merged for m in model.modules() if isinstance(m, LoraLinear))
    torch.testing.assert_close(model(x).logits, out, rtol=1e-5, atol=1e-5)
    q = model.model.layers[0].self_attn.q_proj
    assert not torch.equal(q.base.weight, before["model.layers.0.self_attn.q_proj.base.weight"])
    unmerge_lora(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_lora_fa_freezes_a_and_counts_match_peft_b_only():
    model = apply_lora_fa(tiny(), LoraConfig(r=4, target_modules=TARGETS))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_B." in n for n in trainable)
    # B of every target: sum over layers of out_features × r
    expected = sum(m.out_features * 4 for m in model.modules() if isinstance(m, LoraLinear))
    assert parameter_count(model, trainable_only=True) == expected
    # A frozen but saved: the adapter state carries it
    assert any(".lora_A." in k for k in trainable_state_dict(model))
    # one SGD step moves B only
    x = ids()
    a_before = model.model.layers[0].self_attn.q_proj.lora_A.weight.clone()
    model(x, labels=x).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert torch.equal(model.model.layers[0].self_attn.q_proj.lora_A.weight, a_before)
    assert model.model.layers[0].self_attn.q_proj.lora_B.weight.abs().sum() > 0


def test_lora_save_load_is_exact(tmp_path):
    cfg = LoraConfig(r=4, target_modules=TARGETS, freeze_a=True)
    src = apply_lora(tiny(), cfg)
    randomise_b(src)
    save_trainable(src, tmp_path / "adapter.safetensors")
    dst = apply_lora(load_model("tiny-llama", seed=0).model, cfg)  # same base, fresh adapter (other random A)
    assert not torch.equal(dst(ids()).logits, src(ids()).logits)
    load_trainable_file(dst, tmp_path / "adapter.safetensors")
    assert torch.equal(dst(ids()).logits, src(ids()).logits)
    dst2 = apply_lora(load_model("tiny-llama", seed=0).model, cfg)
    load_lora_state_dict(dst2, lora_state_dict(src))
    assert torch.equal(dst2(ids()).logits, src(ids()).logits)
    with pytest.raises(KeyError, match="missing"):
        load_trainable(dst, {})


def test_lora_works_on_our_llama():
    hf = tiny()
    ours = load_model("tiny-llama", seed=0, impl="effref").model
    apply_lora(hf, LoraConfig(r=2, target_modules=("q_proj", "v_proj")))
    apply_lora(ours, LoraConfig(r=2, target_modules=("q_proj", "v_proj")))
    randomise_b(hf)
    sd = {k.replace("model.layers", "blocks").replace("self_attn", "attn"): v
          for k, v in trainable_state_dict(hf).items()}
    load_trainable(ours, sd)
    x = ids()
    torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-4, atol=1e-4)


class QuantLike(nn.Module):
    """A linear-like layer with no float weight (stands in for a quantized linear)."""

    def __init__(self, k=8, d=8):
        super().__init__()
        self.in_features, self.out_features = k, d
        self.register_buffer("codes", torch.randint(-8, 8, (d, k), dtype=torch.int8))

    def forward(self, x):
        return x @ self.codes.float().T


def test_lora_wraps_a_quantized_like_layer_but_refuses_to_merge_it():
    layer = LoraLinear(QuantLike(), r=2, alpha=4)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), layer.base(x))
    with pytest.raises(TypeError, match="dequantize"):
        layer.merge()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"r": 0}, ValueError, "r=0 must be a positive"),
    ({"r": -2}, ValueError, "r=-2 must be a positive"),
    ({"r": 65}, ValueError, "r=65 exceeds min"),
    ({"r": 4, "target_modules": ("qkv",)}, ValueError, "match no linear layer.*q_proj"),
    ({"r": 4, "dropout": 1.5}, ValueError, "dropout=1.5"),
    ({"r": 4, "alpha": 0}, ValueError, "alpha=0 must be a positive number"),  # an adapter with no effect
    ({"r": 4, "alpha": -8}, ValueError, "alpha=-8 must be a positive number"),
])
def test_apply_lora_rejects_bad_input(kwargs, error, match):
    model = tiny()
    with pytest.raises(error, match=match):
        apply_lora(model, LoraConfig(**kwargs))
    assert not any(isinstance(m, LoraLinear) for m in model.modules())  # untouched


def test_merging_a_model_without_lora_is_an_error():
    with pytest.raises(ValueError, match="apply_lora"):
        merge_lora(tiny())


def test_merge_and_unload_gives_the_plain_model_peft_gives(tmp_path):
    # peft's merge_and_unload: the adapters folded in, the wrappers gone, nothing kept on the side
    base, ours, theirs, _ = lora_and_peft_twin()
    x = ids()
    with torch.no_grad():
        adapted = ours(x).logits
    plain = merge_and_unload(ours)
    theirs = theirs.merge_and_unload()
    assert type(plain) is type(base) and not any(isinstance(m, LoraLinear) for m in plain.modules())
    assert plain.state_dict().keys() == base.state_dict().keys()  # no A, B or pre-merge copies left
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, adapted, rtol=1e-5, atol=1e-5)
    plain.save_pretrained(tmp_path)  # a plain transformers model again: the round trip is exact
    loaded = type(base).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, plain(x).logits)


def test_merge_and_unload_refuses_a_base_it_cannot_fold_into_and_changes_nothing():
    class QuantLike(nn.Module):  # a quantized base: in/out features, a forward, no float weight
        in_features, out_features = 8, 8

        def forward(self, x):
            return x

    model = nn.Sequential(nn.Linear(8, 8), QuantLike())
    apply_lora(model, LoraConfig(r=2, target_modules=("0", "1")))
    before = [type(m) for m in model.modules()]
    with pytest.raises(TypeError, match="cannot merge 1 .*no floating-point `weight`"):
        merge_and_unload(model)
    assert [type(m) for m in model.modules()] == before and not model[0].merged


def test_lora_config_takes_peft_names_and_all_linear():
    assert LoraConfig(lora_alpha=32, lora_dropout=0.1) == LoraConfig(alpha=32, dropout=0.1)
    with pytest.raises(ValueError, match="alpha=8 and lora_alpha=32 disagree"):
        LoraConfig(alpha=8, lora_alpha=32)
    model = apply_lora(tiny(), LoraConfig(r=2, target_modules="all-linear"))
    wrapped = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # not lm_head


def test_merging_nan_is_refused_and_nothing_changes():
    model = apply_lora(tiny(), LoraConfig(r=4, target_modules=TARGETS))
    randomise_b(model)
    layer = [m for m in model.modules() if isinstance(m, LoraLinear)][-1]  # the last: the others come first
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("nan")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for merge in (merge_lora, merge_and_unload):
        with pytest.raises(ValueError, match="gives inf or NaN weights"):
            merge(model)
        assert not any(m.merged for m in model.modules() if isinstance(m, LoraLinear))
        assert all(torch.equal(state[k].nan_to_num(), v.nan_to_num()) for k, v in model.state_dict().items())
