"""Every PEFT method on every transformers family a course uses (tiny random models, fast).

For each (method, family) the method runs; one training step gives finite gradients to exactly the method's own
parameters, on the modules that family really has (listed here by hand, not read from effref), with the base
frozen; where the method promises an unchanged model at initialisation the logits are bit-identical; a mergeable
adapter merges into the same logits. Or the family is refused by name (REFUSED), and nothing changed. A call that
fails part-way (a rank too large for the last layer, a target the family lacks) leaves the model exactly as it was.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import transformers
from tiny_families import FAMILIES, IDS
from torch import nn

from effref.peft import LoraConfig, LoraLinear, apply_lora, apply_lora_fa, merge_and_unload
from effref.peft.adalora import AdaLoraConfig, SVDLinear, apply_adalora
from effref.peft.adapters import AdapterConfig, BottleneckAdapter, apply_adapters
from effref.peft.dylora import DyLoraConfig, DyLoraLinear, apply_dylora
from effref.peft.ia3 import IA3Config, IA3Linear, apply_ia3
from effref.peft.llama_adapter import AdaptedAttention, LlamaAdapterConfig, apply_llama_adapter
from effref.peft.loftq import LoftQConfig, apply_loftq
from effref.peft.lomo import Lomo, LomoConfig
from effref.peft.longlora import use_s2_attention
from effref.peft.lora import lora_state_dict
from effref.peft.lorahub import LoraHubConfig, compose_lora, lorahub_search
from effref.peft.mezo import MezoConfig, mezo_step
from effref.peft.peqa import GroupQuantLinear, PeqaConfig, apply_peqa
from effref.peft.prefix_tuning import PrefixConfig, apply_prefix_tuning, apply_ptuning_v2
from effref.peft.prompt_tuning import PromptTuningConfig, apply_p_tuning, apply_prompt_tuning
from effref.peft.qa_lora import QALoraConfig, QALoraLinear, apply_qa_lora, merge_qa_lora
from effref.peft.qlora import NF4Linear, apply_qlora, quantize_model_nf4
from effref.peft.tied_lora import TiedLoraConfig, TiedLoraLinear, apply_tied_lora

LAYERS = 2  # every tiny family has two blocks
LLAMA_LIKE = ("llama", "mistral", "qwen2", "gemma")


def per_family(llama_like, opt, gpt2) -> dict:
    return {family: llama_like for family in LLAMA_LIKE} | {"opt": opt, "gpt2": gpt2}


# Per block, the last name of every module a method should wrap (GPT-2 fuses q, k, v in c_attn and has a c_proj
# in its attention and in its MLP; OPT has no MLP module, its fc1 and fc2 sit in the decoder layer).
QUERY_VALUE = per_family(["q_proj", "v_proj"], ["q_proj", "v_proj"], ["c_attn"])
KEY_VALUE_MLP_OUT = per_family(["k_proj", "v_proj", "down_proj"], ["k_proj", "v_proj", "fc2"], ["c_attn", "c_proj"])
BLOCKS = per_family(["self_attn", "mlp"], ["self_attn", "fc2"], ["attn", "mlp"])
LINEARS = per_family(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], ["c_attn", "c_proj", "c_fc", "c_proj"])
ATTENTION = per_family(["self_attn"], ["self_attn"], ["attn"])
# The last layer of these names is where the atomicity test plants a layer that no config fits.
LAST_QUERY_VALUE = per_family("v_proj", "v_proj", "c_attn")
LAST_MLP_OUT = per_family("down_proj", "fc2", "mlp.c_proj")
LAST_QUERY = per_family("q_proj", "q_proj", "c_attn")

LORA_AB = r"\.lora_[AB]\.weight$"


@dataclass
class Method:
    apply: Callable[[nn.Module], nn.Module]  # returns what to run: the model itself or a wrapper around it
    trains: str  # a regex the names of exactly the trained parameters match
    wraps: tuple[tuple[type, dict], ...] = ()  # (module type, per family the modules of one block it sits on)
    layers: int = LAYERS  # blocks that get them
    unchanged_at_init: bool = False  # a function-preserving init (zero B, ones, zero gate, ...)
    merge: Callable[[nn.Module], nn.Module] | None = None


def returns_model(call: Callable[[nn.Module], object]) -> Callable[[nn.Module], nn.Module]:
    """For model-level calls that return something else (LoftQ's errors): run the call, then hand back the model."""
    def apply(model: nn.Module) -> nn.Module:
        call(model)
        return model
    return apply


METHODS = {
    "lora": Method(lambda m: apply_lora(m, LoraConfig(r=4)), LORA_AB, ((LoraLinear, QUERY_VALUE),),
                   unchanged_at_init=True, merge=merge_and_unload),
    "lora-fa": Method(lambda m: apply_lora_fa(m, LoraConfig(r=4)), r"\.lora_B\.weight$",
                      ((LoraLinear, QUERY_VALUE),), unchanged_at_init=True, merge=merge_and_unload),
    "series adapter": Method(lambda m: apply_adapters(m, AdapterConfig(bottleneck=4)),
                             r"\.adapter_(down|up)\.(weight|bias)$", ((BottleneckAdapter, BLOCKS),),
                             unchanged_at_init=True),
    "parallel adapter": Method(lambda m: apply_adapters(m, AdapterConfig(bottleneck=4, placement="parallel")),
                               r"\.adapter_(down|up)\.(weight|bias)$", ((BottleneckAdapter, BLOCKS),),
                               unchanged_at_init=True),
    "ia3": Method(lambda m: apply_ia3(m, IA3Config()), r"\.ia3_l$", ((IA3Linear, KEY_VALUE_MLP_OUT),),
                  unchanged_at_init=True, merge=merge_and_unload),
    "prefix tuning": Method(lambda m: apply_prefix_tuning(m, PrefixConfig(n_virtual=3)), r"^encoder\."),
    "p-tuning v2": Method(lambda m: apply_ptuning_v2(m, n_virtual=3), r"^encoder\."),
    "prompt tuning": Method(lambda m: apply_prompt_tuning(m, PromptTuningConfig(n_virtual=3)),
                            r"^prompt_embedding$"),
    "p-tuning": Method(lambda m: apply_p_tuning(m, n_virtual=3, encoder="lstm", encoder_hidden=16), r"^encoder\."),
    "llama-adapter": Method(lambda m: apply_llama_adapter(m, LlamaAdapterConfig(n_prompt=3, n_layers=1)),
                            r"\.(prompt|gate)$", ((AdaptedAttention, ATTENTION),), layers=1,
                            unchanged_at_init=True),
    "adalora": Method(lambda m: apply_adalora(m, AdaLoraConfig(init_r=4, target_r=2)), r"\.lora_[AEB]$",
                      ((SVDLinear, QUERY_VALUE),), unchanged_at_init=True, merge=merge_and_unload),
    "dylora": Method(lambda m: apply_dylora(m, DyLoraConfig(r=4)), LORA_AB, ((DyLoraLinear, QUERY_VALUE),),
                     unchanged_at_init=True, merge=merge_and_unload),
    "tied-lora": Method(lambda m: apply_tied_lora(m, TiedLoraConfig(r=4)), r"\.(u|v|shared\.[AB])$",
                        ((TiedLoraLinear, QUERY_VALUE),), unchanged_at_init=True, merge=merge_and_unload),
    "loftq": Method(returns_model(lambda m: apply_loftq(m, LoraConfig(r=4), LoftQConfig(iterations=1))), LORA_AB,
                    ((LoraLinear, QUERY_VALUE), (NF4Linear, QUERY_VALUE))),
    "qlora": Method(lambda m: apply_qlora(m, LoraConfig(r=4)), LORA_AB,
                    ((LoraLinear, QUERY_VALUE), (NF4Linear, LINEARS))),
    "qa-lora": Method(lambda m: apply_qa_lora(m, QALoraConfig(r=2, group_size=16)), LORA_AB,
                      ((QALoraLinear, LINEARS), (GroupQuantLinear, LINEARS)), merge=merge_qa_lora),
    "peqa": Method(lambda m: apply_peqa(m, PeqaConfig(group_size=16)), r"\.scale$", ((GroupQuantLinear, LINEARS),)),
    "longlora (s2-attn + lora)": Method(lambda m: use_s2_attention(apply_lora(m, LoraConfig(r=4)), group_size=4),
                                        LORA_AB, ((LoraLinear, QUERY_VALUE),)),
}
REFUSED: dict[tuple[str, str], str] = {  # (family, method): what the refusal says; none left at present
}


def part(name: str) -> str:
    """The last name of a wrapped module, seen through the wrappers around it ("q_proj.base" -> "q_proj")."""
    while name.endswith(".base"):
        name = name.removesuffix(".base")
    return name.rsplit(".", 1)[-1]


def logits_of(run: nn.Module) -> torch.Tensor:
    out = run(IDS)
    return getattr(out, "logits", out)  # (1, T, V): the wrappers return the tensor itself


def next_token_loss(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[0, :-1], IDS[0, 1:])


def snapshot(model: nn.Module) -> tuple:
    """All a failed call must leave as it was: tensors, module types, trainability, attention implementation."""
    return ({k: v.clone() for k, v in model.state_dict().items()}, [(n, type(m)) for n, m in model.named_modules()],
            {n: p.requires_grad for n, p in model.named_parameters()},
            getattr(getattr(model, "config", None), "_attn_implementation", None))


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    state, *rest = snapshot(model)
    assert state.keys() == before[0].keys()
    assert all(torch.equal(before[0][k], v) for k, v in state.items()), "a tensor changed"
    assert rest == list(before[1:]), "module types, requires_grad or the attention implementation changed"


def fresh(family: str) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[family]().eval()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_method_runs_and_trains_on_family_or_refuses_it_by_name(family, method):
    spec, model = METHODS[method], fresh(family)
    with torch.no_grad():
        dense = model(IDS).logits
    if (family, method) in REFUSED:
        before = snapshot(model)
        with pytest.raises((ValueError, TypeError), match=REFUSED[family, method]):
            spec.apply(model)
        assert_unchanged(model, before)
        return
    run = spec.apply(model)
    for kind, per_block in spec.wraps:  # on the modules this family really has, in every adapted block
        wrapped = Counter(part(n) for n, m in run.named_modules() if isinstance(m, kind))
        assert wrapped == Counter(per_block[family] * spec.layers), f"{kind.__name__} sits on {dict(wrapped)}"

    logits = logits_of(run)  # (1, T, V)
    assert logits.shape == dense.shape and logits.isfinite().all()
    if spec.unchanged_at_init:
        assert torch.equal(logits, dense), f"{method} changes the {family} model at initialisation"

    next_token_loss(logits).backward()
    params = dict(run.named_parameters())
    trained = {n for n, p in params.items() if p.requires_grad}
    assert trained and trained == {n for n in params if re.search(spec.trains, n)}, \
        f"{method} on {family} trains {sorted(trained)[:4]}"
    assert all(params[n].grad is not None and params[n].grad.isfinite().all() for n in trained)
    assert sum(float(params[n].grad.abs().sum()) for n in trained) > 0
    assert all(p.grad is None for n, p in params.items() if n not in trained), "a frozen base weight got a gradient"

    with torch.no_grad():  # one SGD step, then the step must show (and a merge must keep it)
        for n in trained:
            params[n] -= 0.5 * params[n].grad
        stepped = logits_of(run)
    assert stepped.isfinite().all() and not torch.equal(stepped, logits)
    if spec.merge is not None:
        with torch.no_grad():
            merged = logits_of(spec.merge(run))
        torch.testing.assert_close(merged, stepped, rtol=1e-4, atol=1e-4)


# --- a call that fails changes nothing -------------------------------------------------------------------------


def unfit(suffix: dict[str, str], layer: Callable[[], nn.Module] = lambda: nn.Linear(36, 2)):
    """Make the last module named ``…suffix`` (per family) a ``layer()`` no config fits (36→2: no rank, bottleneck,
    group size or 64-block), so that a model-level call fails only when it reaches the last block."""
    def prepare(model: nn.Module, family: str) -> None:
        name = [n for n, _ in model.named_modules() if n.endswith("." + suffix[family])][-1]
        model.set_submodule(name, layer())
    return prepare


@dataclass
class Failure:
    call: Callable[[nn.Module, str], object]  # (model, family)
    match: str
    prepare: Callable[[nn.Module, str], None] | None = None  # done to the model before the snapshot


FAILURES = {
    "apply_lora": Failure(lambda m, f: apply_lora(m, LoraConfig(r=4)), "r=4", unfit(LAST_QUERY_VALUE)),
    "apply_lora_fa": Failure(lambda m, f: apply_lora_fa(m, LoraConfig(r=4)), "r=4", unfit(LAST_QUERY_VALUE)),
    "apply_adapters": Failure(lambda m, f: apply_adapters(m, AdapterConfig(bottleneck=4)), "bottleneck=4",
                              unfit(LAST_MLP_OUT)),
    "apply_ia3": Failure(lambda m, f: apply_ia3(m, IA3Config(target_modules=(*QUERY_VALUE[f], "down_prj"))),
                         r"match no linear layer .*'down_prj'"),
    "apply_prefix_tuning": Failure(lambda m, f: apply_prefix_tuning(m, LoraConfig()), "must be a PrefixConfig"),
    "apply_prompt_tuning": Failure(lambda m, f: apply_prompt_tuning(m, PromptTuningConfig(n_virtual=3),
                                                                    init_prompt=torch.zeros(2, 64)), "expected"),
    "apply_llama_adapter": Failure(lambda m, f: apply_llama_adapter(m, LlamaAdapterConfig(n_prompt=3, n_layers=2)),
                                   "none of the projection sets", unfit(LAST_QUERY, nn.Identity)),
    "apply_adalora": Failure(lambda m, f: apply_adalora(m, AdaLoraConfig(init_r=4, target_r=2)), "init_r=4",
                             unfit(LAST_QUERY_VALUE)),
    "apply_dylora": Failure(lambda m, f: apply_dylora(m, DyLoraConfig(r=4)), "r=4", unfit(LAST_QUERY_VALUE)),
    "apply_tied_lora": Failure(lambda m, f: apply_tied_lora(m, TiedLoraConfig(r=4)), "r=4", unfit(LAST_QUERY_VALUE)),
    "apply_loftq": Failure(lambda m, f: apply_loftq(m, LoraConfig(r=4), LoftQConfig(iterations=1)), "r=4",
                           unfit(LAST_QUERY_VALUE)),
    "apply_qlora (LoRA rank)": Failure(lambda m, f: apply_qlora(m, LoraConfig(r=4)), "r=4", unfit(LAST_QUERY_VALUE)),
    "apply_qlora (NF4 block)": Failure(lambda m, f: apply_qlora(m, LoraConfig(r=4)), "block_size=64 does not divide",
                                       unfit(LAST_MLP_OUT)),
    "quantize_model_nf4": Failure(lambda m, f: quantize_model_nf4(m), "block_size=64 does not divide",
                                  unfit(LAST_MLP_OUT)),
    "apply_qa_lora": Failure(lambda m, f: apply_qa_lora(m, QALoraConfig(r=2, group_size=16)),
                             "group_size=16 does not divide in_features=36", unfit(LAST_MLP_OUT)),
    "apply_peqa": Failure(lambda m, f: apply_peqa(m, PeqaConfig(group_size=16)),
                          "group_size=16 does not divide in_features=36", unfit(LAST_MLP_OUT)),
    "use_s2_attention": Failure(lambda m, f: use_s2_attention(m, 3), "group_size=3 must be an even number"),
    "Lomo": Failure(lambda m, f: Lomo(m), "no trainable parameters", lambda m, f: m.requires_grad_(False)),
}


@pytest.mark.parametrize("call", FAILURES)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_failing_call_leaves_the_model_as_it_was(family, call):
    failure, model = FAILURES[call], fresh(family)
    if failure.prepare is not None:
        failure.prepare(model, family)
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=failure.match):
        failure.call(model, family)
    assert_unchanged(model, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_failing_lorahub_search_puts_the_lora_matrices_back(family):
    model = apply_lora(fresh(family), LoraConfig(r=2))
    modules = [{k: torch.randn_like(v) for k, v in lora_state_dict(model).items()} for _ in range(2)]
    before, calls = snapshot(model), []

    def loss_fn(m: nn.Module) -> float:
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("loss_fn failed on its third call")
        return float(next_token_loss(logits_of(m)))

    with pytest.raises(ValueError, match="third call"):
        lorahub_search(model, modules, loss_fn, LoraHubConfig(max_evals=10))
    assert_unchanged(model, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_failing_mezo_step_moves_the_parameters_back(family):
    """θ + εz − εz is θ only up to rounding (MeZO never stores z), so this one is close, not bit-equal."""
    model = fresh(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []

    def loss_fn() -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("loss_fn failed at θ − εz")
        return next_token_loss(logits_of(model))

    with pytest.raises(ValueError, match="θ − εz"):
        mezo_step(model, loss_fn, MezoConfig(lr=1e-3), seed=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)


RAW_GPT2 = dict(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4)
LINEAR_METHODS = ("lora", "lora-fa", "series adapter", "ia3", "llama-adapter", "adalora", "dylora", "tied-lora",
                  "loftq", "qlora", "qa-lora", "peqa")


@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_gpt2_with_its_conv1d_layers_is_refused_with_the_conversion_to_do(method):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**RAW_GPT2)).eval()
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=r"Conv1D.*linear_from_conv1d\(model\)"):
        METHODS[method].apply(model)
    assert_unchanged(model, before)


# --- identities that hold on every family -----------------------------------------------------------------------

CONTEXT = torch.tensor([[5, 6, 7]])  # three real tokens (1, n)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_soft_prompt_of_token_embeddings_is_those_tokens(family):
    base = fresh(family)
    model = apply_prompt_tuning(copy.deepcopy(base), PromptTuningConfig(n_virtual=3, init="text",
                                                                       init_ids=tuple(CONTEXT[0].tolist())))
    with torch.no_grad():
        expected = base(torch.cat([CONTEXT, IDS], dim=1)).logits[:, 3:]  # (1, T, V)
        torch.testing.assert_close(model(IDS), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prefix_of_cached_keys_and_values_is_the_tokens_that_left_them(family):
    base = fresh(family)
    model = apply_ptuning_v2(copy.deepcopy(base), n_virtual=3)
    with torch.no_grad():
        cache = base(CONTEXT, use_cache=True).cache
        flat = torch.stack([t[0] for layer in cache.layers for t in (layer.keys, layer.values)])  # (2L, n_kv, 3, dh)
        model.encoder.embedding.weight.copy_(flat.permute(2, 0, 1, 3).reshape(3, -1))  # (n, L·2·n_kv·dh)
        expected = base(torch.cat([CONTEXT, IDS], dim=1)).logits[:, 3:]
        torch.testing.assert_close(model(IDS), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_s2_attention_is_full_attention_with_one_group_and_local_with_more(family):
    base = fresh(family)
    with torch.no_grad():
        dense = base(IDS).logits
        one_group = use_s2_attention(copy.deepcopy(base), IDS.shape[1])(IDS).logits
        four_groups = use_s2_attention(copy.deepcopy(base), 4)(IDS).logits
        back = use_s2_attention(use_s2_attention(copy.deepcopy(base), 4), None)(IDS).logits
    torch.testing.assert_close(one_group, dense, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(four_groups, dense, atol=1e-3)
    torch.testing.assert_close(back, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_llama_adapter_prompt_term_by_hand_on_models_without_rope(family):
    """tanh(g_h) · softmax(q_h K_hᵀ/√d_head) V_h per head, through the output weight without its bias."""
    model = apply_llama_adapter(fresh(family), LlamaAdapterConfig(n_prompt=3, n_layers=1))
    layer = next(m for m in model.modules() if isinstance(m, AdaptedAttention))
    with torch.no_grad():
        layer.gate.copy_(torch.linspace(0.3, 1.2, 4))
    x = torch.randn(1, 5, 64)
    a = layer.attn
    if family == "gpt2":
        w, b = a.c_attn.weight.split(64), a.c_attn.bias.split(64)  # rows of q, k, v
        q, k, v = x @ w[0].T + b[0], layer.prompt @ w[1].T + b[1], layer.prompt @ w[2].T + b[2]
        out_weight = a.c_proj.weight
    else:
        q = a.q_proj(x)
        k, v = a.k_proj(layer.prompt), a.v_proj(layer.prompt)
        out_weight = a.out_proj.weight
    heads = []
    for h in range(4):
        cols = slice(16 * h, 16 * (h + 1))
        scores = (q[0, :, cols] @ k[:, cols].T / math.sqrt(16)).softmax(-1)  # (5, 3)
        heads.append(math.tanh(layer.gate[h]) * scores @ v[:, cols])  # (5, 16)
    expected = torch.cat(heads, dim=-1) @ out_weight.T  # (5, 64)
    torch.testing.assert_close(layer.prompt_term(x)[0], expected, rtol=1e-5, atol=1e-5)


# --- the optimizers: any family, any trainable set ----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_lomo_updates_every_parameter_once_inside_backward(family):
    model = fresh(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lomo = Lomo(model, LomoConfig(lr=1e-2))
    next_token_loss(logits_of(model)).backward()
    params = dict(model.named_parameters())  # tied weights (GPT-2's wte / lm_head) appear once
    assert lomo.updates == len(params)
    assert all(p.grad is None and p.isfinite().all() and not torch.equal(p, before[n]) for n, p in params.items())
    lomo.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_mezo_moves_exactly_the_trainable_parameters(family):
    model = fresh(family)
    embeddings = model.get_input_embeddings().weight
    embeddings.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = mezo_step(model, lambda: next_token_loss(logits_of(model)), MezoConfig(lr=1e-3), seed=0)
    assert math.isfinite(loss)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (not p.requires_grad), n


@pytest.mark.parametrize("family", FAMILIES)
def test_lorahub_loads_the_composition_it_found(family):
    model = apply_lora(fresh(family), LoraConfig(r=2))
    g = torch.Generator().manual_seed(0)
    modules = [{k: torch.randn(v.shape, generator=g) * 0.1 for k, v in lora_state_dict(model).items()}
               for _ in range(2)]
    result = lorahub_search(model, modules, lambda m: float(next_token_loss(logits_of(m))), LoraHubConfig(max_evals=6))
    loaded, expected = lora_state_dict(model), compose_lora(modules, result.weights)
    assert all(torch.allclose(loaded[k], expected[k]) for k in expected)
    assert math.isfinite(result.objective) and logits_of(model).isfinite().all()
