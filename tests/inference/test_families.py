"""Every inference technique on every transformers family a course uses (tiny random models, fast).

The LLaMA-shaped families (LLaMA, Mistral, Qwen2, Gemma, and Gemma with head_dim decoupled from hidden / heads)
are converted with ``Llama.from_hf``; then every lossless technique must emit exactly the tokens of
transformers' own greedy decoding (``hf.generate(do_sample=False)``), an independent implementation, and every
lossy one must run and emit valid tokens (at its lossless setting, it too must equal greedy decoding). OPT and
GPT-2 are not LLaMA-shaped: every technique refuses the raw transformers model by architecture, saying that
``Llama.from_hf`` cannot convert it; a raw LLaMA-shaped model is refused with the conversion to use.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from tiny_families import FAMILIES, IDS, LLAMA_LIKE, VOCAB

from effref.inference import (
    BiLDConfig,
    H2OCache,
    LookaheadConfig,
    MedusaHeads,
    ScissorhandsCache,
    SkipDecodeConfig,
    SpeculativeConfig,
    StreamingCache,
    bild_generate,
    decode_greedy,
    layer_skip_draft,
    llma_generate,
    lookahead_generate,
    medusa_generate,
    skipdecode_generate,
    specinfer_generate,
    speculative_generate,
)
from effref.inference.dejavu import fit_predictors, sparse_mlp, sparsified
from effref.inference.dejavu_heads import head_contributions, head_outputs, sparse_attention
from effref.inference.dejavu_predictor import DejaVuConfig
from effref.inference.flexgen import T4_FLEXGEN, ModelShape, search_policy
from effref.models.llama import Llama
from effref.serving import Engine

NEW = 12  # tokens generated after the 16-token prompt IDS
ALL_FAMILIES = {**FAMILIES, "gemma-head_dim32": lambda: transformers.GemmaForCausalLM(
    transformers.GemmaConfig(**LLAMA_LIKE, head_dim=32))}  # q_proj 64 -> 128: d_head != hidden / heads
CONVERTIBLE = ["llama", "mistral", "qwen2", "gemma", "gemma-head_dim32"]
NOT_LLAMA_SHAPED = ["opt", "gpt2"]


@functools.cache
def hf_model(family: str) -> transformers.PreTrainedModel:
    """The family's tiny model with larger random weights (peaked next-token distributions, so that greedy
    decoding rarely meets a near-tie) and random biases and norm gains (transformers sets them to 0 and 1)."""
    torch.manual_seed(0)
    model = ALL_FAMILIES[family]().eval()
    model.generation_config.eos_token_id = None  # never stop early: compare every token
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(std=0.2)
            elif name.endswith("norm.weight"):  # Gemma scales by 1 + w, the others by w
                p.uniform_(-0.5, 0.5).add_(0.0 if family.startswith("gemma") else 1.0)
            else:
                p.normal_(std=0.5)  # Qwen2's q/k/v biases (OPT's and GPT-2's LayerNorm and biases too)
    return model


@functools.cache
def hf_greedy(family: str) -> torch.Tensor:
    """transformers' greedy decoding of IDS: (1, 16 + NEW)."""
    hf = hf_model(family)
    with torch.no_grad():
        return hf.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=NEW, do_sample=False)


def medusa_heads() -> MedusaHeads:
    torch.manual_seed(0)
    heads = MedusaHeads(64, n_heads=2)  # every family here has hidden size 64
    with torch.no_grad():
        for layer in heads.residual:
            layer.weight.normal_(std=0.5)
    return heads


def with_reference_errors(tokens: torch.Tensor) -> list[int]:
    """A reference document for LLMA: greedy text from the prompt's end, every 4th token wrong (copies fail)."""
    ref = tokens[0, 10:].tolist()
    return [(t + 1) % VOCAB if i % 4 == 3 else t for i, t in enumerate(ref)]


def greedy_without_cache(model, n: int) -> torch.Tensor:
    ids = IDS
    for _ in range(n):
        with torch.no_grad():
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)  # (1, T + 1)
    return ids


def kv(cls, budget: int, **knobs):
    def run(m, ref):
        cache = cls.for_model(m, 1, budget=budget, **knobs)
        return torch.cat([IDS, decode_greedy(m, IDS, NEW, cache, progress=False)], dim=1)  # (1, 16 + NEW)
    return run


def skip(max_layers: int, min_layers: int, where: str = "lower"):
    return lambda m, ref: skipdecode_generate(m, IDS, NEW, SkipDecodeConfig(max_layers, min_layers, where))[0]


def dejavu(keep: float, selector: str, part: str):
    def run(m, ref):
        calib = torch.cat([IDS, ref], dim=1)  # (1, 16 + 16 + NEW)
        predictors = fit_predictors(m, calib, DejaVuConfig(rank=4), part) if selector == "predictor" else None
        with sparsified(m, keep, selector, predictors, part=part):
            return greedy_without_cache(m, NEW) if part == "attn" else m.generate(IDS, NEW)
    return run


def spec(temperature: float, keep: int = 1):
    def run(m, ref):
        config = SpeculativeConfig(gamma=3, temperature=temperature)
        generator = torch.Generator().manual_seed(0)
        return speculative_generate(m, layer_skip_draft(m, keep), IDS, NEW, config, generator).tokens
    return run


def specinfer(keep: int, branching: tuple[int, ...]):
    return lambda m, ref: specinfer_generate(m, layer_skip_draft(m, keep), IDS, NEW, branching).tokens


def bild(config: BiLDConfig):
    return lambda m, ref: bild_generate(m, layer_skip_draft(m, 1), IDS, NEW, config).tokens


def engine(draft_keep: int | None = None):
    def run(m, ref):
        draft = {} if draft_keep is None else {"draft": layer_skip_draft(m, draft_keep), "gamma": 3}
        new = Engine(m, num_blocks=16, block_size=4, max_batch=2, **draft).generate([IDS[0].tolist()], NEW)[0]
        return torch.cat([IDS, torch.tensor([new])], dim=1)
    return run


# name -> (lossless: must equal transformers' greedy decoding, call(model, greedy tokens) -> tokens (1, 16 + NEW)).
# A 1-block draft of these random 2-block models is rejected almost always; the 2-block "draft" (the model
# itself) is accepted always: together they run both paths of the verification.
TECHNIQUES = {
    "speculative greedy": (True, spec(0.0)),
    "speculative greedy, perfect draft": (True, spec(0.0, keep=2)),
    "speculative sampling": (False, spec(1.0)),
    "specinfer": (True, specinfer(1, (2, 2, 1))),
    "specinfer, perfect draft": (True, specinfer(2, (2, 1))),
    "medusa": (True, lambda m, ref: medusa_generate(m, medusa_heads(), IDS, NEW, (3, 2)).tokens),
    "lookahead": (True, lambda m, ref: lookahead_generate(m, IDS, NEW, LookaheadConfig()).tokens),
    "llma": (True, lambda m, ref: llma_generate(m, IDS, NEW, with_reference_errors(ref), copy_len=4).tokens),
    "bild, always roll back": (True, bild(BiLDConfig(rollback_threshold=0.0))),
    "bild": (False, bild(BiLDConfig())),
    "streamingllm, budget 64": (True, kv(StreamingCache, 64, sinks=2)),
    "streamingllm, budget 8": (False, kv(StreamingCache, 8, sinks=2)),
    "h2o, budget 64": (True, kv(H2OCache, 64, recent=3)),
    "h2o, budget 8": (False, kv(H2OCache, 8, recent=3)),
    "scissorhands, budget 64": (True, kv(ScissorhandsCache, 64, history=8)),
    "scissorhands, budget 8": (False, kv(ScissorhandsCache, 8, history=8)),
    "skipdecode, 2 of 2 layers": (True, skip(2, 2)),
    "skipdecode, 2 to 1 layers": (False, skip(2, 1)),
    "skipdecode, early exit": (False, skip(2, 1, "upper")),
    "dejavu mlp, keep all": (True, dejavu(1.0, "oracle", "mlp")),
    "dejavu mlp, predictor half": (False, dejavu(0.5, "predictor", "mlp")),
    "dejavu heads, oracle half": (False, dejavu(0.5, "oracle", "attn")),
    "dejavu heads, predictor half": (False, dejavu(0.5, "predictor", "attn")),
    "serving engine": (True, engine()),
    "serving engine, speculative": (True, engine(draft_keep=1)),
    "serving engine, perfect draft": (True, engine(draft_keep=2)),
}
LOSSLESS = [name for name, (lossless, _) in TECHNIQUES.items() if lossless]
LOSSY = [name for name, (lossless, _) in TECHNIQUES.items() if not lossless]


def test_the_greedy_references_are_not_degenerate():
    for family in CONVERTIBLE:
        new = hf_greedy(family)[0, 16:].tolist()
        assert len(set(new)) > 3, f"{family}: transformers' greedy text {new} repeats too much to test anything"


@pytest.mark.parametrize("technique", LOSSLESS)
@pytest.mark.parametrize("family", CONVERTIBLE)
def test_lossless_technique_on_converted_model_equals_transformers_greedy(family: str, technique: str):
    expected = hf_greedy(family)
    got = TECHNIQUES[technique][1](Llama.from_hf(hf_model(family)), expected)
    assert torch.equal(got, expected), f"{technique} on {family}: {got[0, 16:].tolist()} != transformers' " \
                                       f"{expected[0, 16:].tolist()}"


@pytest.mark.parametrize("technique", LOSSY)
@pytest.mark.parametrize("family", CONVERTIBLE)
def test_lossy_technique_on_converted_model_runs_and_emits_valid_tokens(family: str, technique: str):
    got = TECHNIQUES[technique][1](Llama.from_hf(hf_model(family)), hf_greedy(family))
    assert got.shape == (1, 16 + NEW) and got.dtype == torch.long and torch.equal(got[:, :16], IDS)
    assert 0 <= int(got.min()) and int(got.max()) < VOCAB


@pytest.mark.parametrize("family", CONVERTIBLE)
def test_dejavu_gathered_heads_and_neurons_equal_the_dense_computation(family: str):
    """The gathered rows of W_Q, W_K, W_V (and Qwen2's biases, at d_head 16 or 32) and of the GeGLU / SwiGLU MLP
    give what the dense layers give for the kept heads and neurons."""
    model = Llama.from_hf(hf_model(family))
    block, x = model.blocks[1], torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
    cos, sin = model.rope_cos[:16], model.rope_sin[:16]  # (T, d_head)
    heads = torch.tensor([3, 0])  # one query head from each key/value group, out of order
    with torch.no_grad():
        dense = head_contributions(block.attn, head_outputs(block.attn, x, cos, sin))[:, :, heads].sum(2)
        torch.testing.assert_close(sparse_attention(block.attn, x, cos, sin, heads), dense, rtol=1e-5, atol=1e-5)
        neurons = torch.tensor([[5, 70, 2]] * 16)  # (N, k)
        a = block.mlp.act(block.mlp.gate(x[0])) * block.mlp.up(x[0])  # (N, d_ff), the dense activations
        expected = a.gather(1, neurons) @ block.mlp.down.weight.T[neurons[0]]  # (N, d)
        torch.testing.assert_close(sparse_mlp(block.mlp, x[0], neurons), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", CONVERTIBLE)
def test_flexgen_shape_of_converted_model_counts_the_transformers_weights(family: str):
    hf = hf_model(family)
    shape = ModelShape.from_llama_config(Llama.from_hf(hf).cfg, family)
    layer = hf.model.layers[0]
    assert shape.layer_params == sum(p.numel() for p in layer.parameters() if p.ndim == 2)  # matmul weights
    assert (shape.q_dim, shape.kv_dim) == (layer.self_attn.q_proj.out_features, layer.self_attn.k_proj.out_features)
    assert search_policy(shape, T4_FLEXGEN, prompt_len=16, gen_len=NEW, gpu_batches=(1, 8), num_batches=(1,))


@pytest.mark.parametrize("technique", [*TECHNIQUES, "flexgen"])
@pytest.mark.parametrize("family", CONVERTIBLE + NOT_LLAMA_SHAPED)
def test_raw_transformers_model_is_refused_by_architecture(family: str, technique: str):
    hf = hf_model(family)
    if family in NOT_LLAMA_SHAPED:  # no conversion exists: say which architecture, and that from_hf refuses it
        match = rf"{type(hf.config if technique == 'flexgen' else hf).__name__} \(model_type '{family}'\).*" \
                r"Llama\.from_hf"
    else:  # the conversion exists: name it
        match = r"got .*(Config|ForCausalLM).*Llama\.from_hf\(model\)"
    with pytest.raises(TypeError, match=match):
        if technique == "flexgen":
            ModelShape.from_llama_config(hf.config)
        else:
            TECHNIQUES[technique][1](hf, IDS)
