"""Our LLaMA against transformers' LlamaForCausalLM on the same weights, and the KV cache against no cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from effref.models.llama import Attention, KVCache, Llama, LlamaConfig, apply_rope, rope_tables

TINY = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 96, "bos_token_id": 1, "eos_token_id": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}}  # theta and eps are non-default


def hf_tiny(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(HFLlamaConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # HF initialises norm weights to 1; randomise them so a mix-up would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logits_match_transformers(kv_heads: int, tied: bool) -> None:
    hf = hf_tiny(num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    ours = Llama.from_hf(hf)
    assert ours.cfg.rope_theta == 5000.0 and ours.cfg.norm_eps == 1e-5 and ours.cfg.n_kv_heads == kv_heads
    assert (ours.lm_head.weight is ours.embed.weight) == tied
    assert ours.num_parameters() == hf.num_parameters()
    x = ids(2, 40)
    with torch.no_grad():
        expected = hf(x).logits
        got = ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_config_from_hf_reads_rope_theta_in_both_layouts() -> None:
    v5 = LlamaConfig.from_hf(HFLlamaConfig(**TINY))
    old = HFLlamaConfig(**TINY)  # a transformers-4 style config: a bare attribute and no rope_parameters
    del old.rope_parameters
    old.rope_theta = 1234.0
    assert (v5.rope_theta, LlamaConfig.from_hf(old).rope_theta) == (5000.0, 1234.0)
    assert (v5.d_head, v5.max_seq_len, v5.bos_id, v5.eos_id) == (16, 96, 1, 2)


def full_logits(model: Llama, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("chunks", [[1] * 24, [7, 1, 5, 11], [24]], ids=["token-by-token", "uneven", "one"])
def test_cached_decoding_matches_full_forward(chunks: list[int]) -> None:
    model = Llama.from_hf(hf_tiny())
    x = ids(3, sum(chunks))
    cache = model.new_cache(batch_size=3, max_len=32)
    pieces, start = [], 0
    with torch.no_grad():
        for n in chunks:
            pieces.append(model(x[:, start:start + n], cache))
            start += n
    assert cache.length == x.shape[1]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full_logits(model, x), rtol=1e-5, atol=1e-5)


def test_cache_reset_and_truncate_replay_the_same_logits() -> None:
    model = Llama.from_hf(hf_tiny())
    x = ids(1, 12)
    cache = model.new_cache(1, 16)
    with torch.no_grad():
        model(x[:, :8], cache)
        cache.truncate(5)  # drop three tokens, as speculative decoding drops rejected drafts
        after_truncate = model(x[:, 5:12], cache)
        cache.reset()
        after_reset = model(x, cache)
    reference = full_logits(model, x)
    torch.testing.assert_close(after_truncate, reference[:, 5:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after_reset, reference, rtol=1e-5, atol=1e-5)


def test_cache_subclass_sees_every_layer_update() -> None:
    class Counting(KVCache):
        def update(self, layer, k, v):
            self.calls.append((layer, k.shape[2]))
            return super().update(layer, k, v)

    model = Llama.from_hf(hf_tiny())
    cfg = model.cfg
    cache = Counting(cfg.n_layers, 1, cfg.n_kv_heads, cfg.d_head, max_len=8)
    cache.calls = []
    with torch.no_grad():
        model(ids(1, 3), cache)
        model(ids(1, 1), cache)
    assert cache.calls == [(0, 3), (1, 3), (0, 1), (1, 1)] and cache.length == 4


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_greedy_generate_matches_transformers(kv_heads: int) -> None:
    hf = hf_tiny(seed=3, num_key_value_heads=kv_heads)
    hf.generation_config.eos_token_id = None  # never stop early: compare all 20 tokens
    hf.generation_config.pad_token_id = 0
    ours = Llama.from_hf(hf)
    prompt = ids(2, 6, seed=4)
    expected = hf.generate(prompt, max_new_tokens=20, do_sample=False)
    streamed = []
    got = ours.generate(prompt, max_new_tokens=20, stream=streamed.append)
    assert got.shape == (2, 26)
    assert torch.equal(got, expected)
    assert torch.equal(torch.stack(streamed, dim=1), got[:, 6:])
    assert torch.equal(ours.generate(prompt, max_new_tokens=0), prompt)


def test_generate_stops_at_eos_and_pads_finished_rows() -> None:
    ours = Llama.from_hf(hf_tiny(seed=3))
    prompt = ids(2, 6, seed=4)
    free = ours.generate(prompt, max_new_tokens=10)
    eos = int(free[0, 8])  # row 0 emits this token at its third step; make it the end token
    stopped = ours.generate(prompt, max_new_tokens=10, eos_id=eos)
    for row in range(2):
        new = free[row, 6:].tolist()
        end = new.index(eos) if eos in new else None
        if end is None:
            assert stopped.shape[1] == 16 and stopped[row, 6:].tolist() == new
        else:
            assert stopped[row, 6:7 + end].tolist() == new[:end + 1]
            assert (stopped[row, 7 + end:] == eos).all()


def test_sampling_is_seeded_and_top_k_1_is_greedy() -> None:
    model = Llama.from_hf(hf_tiny())
    prompt = ids(2, 5)

    def draw(seed: int, **kw) -> torch.Tensor:
        return model.generate(prompt, 12, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(draw(7, temperature=1.0), draw(7, temperature=1.0))
    assert not torch.equal(draw(7, temperature=5.0), draw(8, temperature=5.0))
    assert torch.equal(draw(7, temperature=1.0, top_k=1), model.generate(prompt, 12))


def test_sampling_frequencies_follow_the_softmax() -> None:
    """One sampled step, 4000 draws: the top token's frequency is within 5 standard errors (p < 1e-6)."""
    model = Llama.from_hf(hf_tiny())
    prompt = ids(1, 4).expand(4000, 4)
    with torch.no_grad():
        p = (full_logits(model, prompt[:1])[0, -1] / 0.5).softmax(-1)
    draws = model.generate(prompt, 1, temperature=0.5, generator=torch.Generator().manual_seed(0))[:, -1]
    top = int(p.argmax())
    freq, se = (draws == top).float().mean(), (p[top] * (1 - p[top]) / 4000) ** 0.5
    assert abs(freq - p[top]) < 5 * se


def _bad_forward(model: Llama, case: str) -> None:
    if case == "1d":
        model(ids(1, 4)[0])
    elif case == "float":
        model(ids(1, 4).float())
    elif case == "id-too-large":
        model(torch.tensor([[1, 2, model.cfg.vocab_size]]))
    elif case == "id-negative":
        model(torch.tensor([[1, -3, 2]]))
    elif case == "too-long":
        model(ids(1, 97))
    elif case == "cache-past-max":
        cache = model.new_cache(1)
        model(ids(1, 90), cache)
        model(ids(1, 7), cache)
    elif case == "cache-batch":
        model(ids(2, 4), model.new_cache(1))
    elif case == "cache-overflow":
        model(ids(1, 9), model.new_cache(1, max_len=8))
    elif case == "generate-too-long":
        model.generate(ids(1, 90), max_new_tokens=7)
    elif case == "negative-temperature":
        model.generate(ids(1, 4), max_new_tokens=2, temperature=-1.0)
    elif case == "top-k-0":
        model.generate(ids(1, 4), max_new_tokens=2, temperature=1.0, top_k=0)
    elif case == "not-a-hf-llama":
        Llama.from_hf(torch.nn.Linear(2, 2))
    elif case == "truncate-beyond":
        cache = model.new_cache(1, 8)
        model(ids(1, 3), cache)
        cache.truncate(4)


@pytest.mark.parametrize("case, match", [
    ("1d", r"shape \(B, T\)"),
    ("float", r"integer token ids"),
    ("id-too-large", r"token ids from 1 to 128, outside this model's vocabulary 0..127"),
    ("id-negative", r"token ids from -3 to 2, outside"),
    ("too-long", r"97 new tokens exceed max_seq_len=96"),
    ("cache-past-max", r"90 cached \+ 7 new tokens exceed max_seq_len=96"),
    ("cache-batch", r"cache.batch_size=1 but input_ids has B=2"),
    ("cache-overflow", r"max_len=8; create the cache with a larger max_len"),
    ("generate-too-long", r"max_new_tokens=7 tokens exceed max_seq_len=96"),
    ("negative-temperature", r"temperature=-1.0"),
    ("top-k-0", r"top_k=0"),
    ("not-a-hf-llama", r"must be a transformers causal LM of LLaMA's shape \(llama, mistral, qwen2, gemma\), "
                       r"got Linear"),
    ("truncate-beyond", r"length=4 must lie in \[0, 3\]"),
])
def test_bad_inputs_raise_with_the_fix(case: str, match: str) -> None:
    model = Llama.from_hf(hf_tiny())
    with pytest.raises(ValueError, match=match), torch.no_grad():
        _bad_forward(model, case)


@pytest.mark.parametrize("kwargs, match", [
    ({"d_model": 64, "n_heads": 5}, r"d_model=64 is not divisible by n_heads=5"),
    ({"d_model": 64, "n_heads": 4, "n_kv_heads": 3}, r"n_heads=4 is not divisible by n_kv_heads=3"),
    ({"d_model": 12, "n_heads": 4, "n_kv_heads": 4}, r"d_head=3 .* is odd"),
    ({"d_model": 64, "n_heads": 4, "head_dim": 7}, r"d_head=7 .* is odd"),
    ({"head_dim": 0}, r"head_dim=0 must be a positive integer"),
    ({"activation": "relu"}, r"activation='relu' is not known; use one of \['gelu_pytorch_tanh', 'silu'\]"),
    ({"embed_scale": 0.0}, r"embed_scale=0.0 must be positive"),
    ({"n_layers": 0}, r"n_layers=0 must be a positive integer"),
])
def test_bad_config_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**{"vocab_size": 16, "d_model": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 4,
                       "d_ff": 32, **kwargs})


@pytest.mark.parametrize("overrides, match", [
    ({"rope_parameters": {"rope_type": "longrope", "factor": 8.0, "rope_theta": 5e5, "short_factor": [1.0] * 4,
                          "long_factor": [2.0] * 4, "original_max_position_embeddings": 64}}, r"'longrope'"),
    ({"attention_bias": True}, r"attention_bias=True is not supported: biases on q, k, v and o"),
    ({"mlp_bias": True}, r"mlp_bias=True is not supported: biases in the MLP"),
    ({"hidden_act": "relu"}, r"hidden_act='relu' is not supported; the gated MLP implements"),
])
def test_unsupported_hf_configs_raise(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf(HFLlamaConfig(**{**TINY, **overrides}))


# --- the real model -----------------------------------------------------------------------------------------

TEXT = ("Mrs. Harcourt's cousin arrived at Allingham on a wet Tuesday, bringing with him a great deal of "
        "luggage, a very small opinion of the country, and a firm resolution to be pleased with nobody. "
        "Within a week he had found fault with the soup, the sermon and the weather, and had somehow "
        "contrived to fall in love with the one young lady in the parish who could not endure him.")


def smollm2_folder() -> Path | None:
    roots = [Path(os.environ["EFFREF_CACHE"])] if os.environ.get("EFFREF_CACHE") else []
    roots.append(Path.home() / ".cache" / "effref")
    for root in roots:
        if (root / "models" / "smollm2-135m" / "config.json").exists():
            return root / "models" / "smollm2-135m"
    return None


@pytest.mark.slow
@pytest.mark.skipif(smollm2_folder() is None,
                    reason="SmolLM2-135M weights not found in $EFFREF_CACHE/models/smollm2-135m or "
                           "~/.cache/effref/models/smollm2-135m "
                           "(fetch them with `python -m effref.assets fetch`)")
def test_smollm2_logits_match_transformers() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = Llama.from_hf(hf)
    x = AutoTokenizer.from_pretrained(folder)(TEXT, return_tensors="pt").input_ids[:, :64]
    assert x.shape == (1, 64)
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    print(f"SmolLM2-135M max |logit difference| over 64 tokens: {diff:.3g}")
    assert diff < 1e-3


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4], ids=["MQA", "GQA", "MHA"])
def test_attention_heads_share_keys_and_values_as_written_per_head(n_kv_heads):
    """Attention, head by head from the definition: query head i reads key/value head i // (n_heads / n_kv)."""
    cfg = LlamaConfig(vocab_size=16, d_model=32, n_heads=4, n_kv_heads=n_kv_heads, n_layers=1, d_ff=8,
                      max_seq_len=16)
    torch.manual_seed(0)
    attn = Attention(cfg, layer=0)
    x = torch.randn(2, 5, cfg.d_model)  # (B, T, d_model)
    cos, sin = rope_tables(cfg.d_head, 5, cfg.rope_theta)
    q = apply_rope(attn.q_proj(x).view(2, 5, 4, cfg.d_head).transpose(1, 2), cos, sin)  # (B, 4, T, d_head)
    k = apply_rope(attn.k_proj(x).view(2, 5, n_kv_heads, cfg.d_head).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(2, 5, n_kv_heads, cfg.d_head).transpose(1, 2)
    causal = torch.ones(5, 5).tril().bool()
    heads = []
    for i in range(4):
        j = i // (4 // n_kv_heads)
        scores = q[:, i] @ k[:, j].transpose(-1, -2) / cfg.d_head**0.5  # (B, T, T)
        heads.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, j])  # (B, T, d_head)
    expected = attn.o_proj(torch.cat(heads, dim=-1))  # (B, T, d_model)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin), expected, rtol=1e-5, atol=1e-5)
    cache = KVCache(1, batch_size=2, n_kv_heads=n_kv_heads, d_head=cfg.d_head, max_len=5)
    assert cache.k[0].numel() == 2 * n_kv_heads * 5 * cfg.d_head  # the cache shrinks with the kv heads


def test_mistral_converts_with_its_window_as_the_length_limit():
    # Mistral is LLaMA plus sliding-window attention; up to the window that is full causal attention
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          sliding_window=16)).eval()
    ours = Llama.from_hf(hf)
    assert ours.cfg.max_seq_len == 16
    x = ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="exceed max_seq_len=16"):
            ours(ids(1, 17))


# --- the other LLaMA-shaped families, and the ones from_hf refuses ----------------------------------------

def hf_family(family: str, seed: int, **overrides) -> transformers.PreTrainedModel:
    """A tiny random Qwen2 / Gemma / LLaMA whose biases and norm gains are random too (transformers sets them to
    0 and 1, which would hide a missing bias or an unfolded (1 + w)), with peaked next-token distributions."""
    make = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[family]
    config = {**{k: v for k, v in TINY.items() if k != "rope_parameters"}, "initializer_range": 0.2, **overrides}
    torch.manual_seed(seed)
    model = make[1](make[0](**config)).eval()
    model.generation_config.eos_token_id = None  # never stop early: compare every token
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # LLaMA/Qwen2 scale by w (around 1), Gemma by 1 + w (w around 0)
                p.uniform_(-0.5, 0.5).add_(0.0 if family == "gemma" else 1.0)
            elif name.endswith("bias"):
                p.normal_(std=0.5)
    return model


FAMILY_CASES = [  # (family, config overrides): GQA everywhere, Gemma also with head_dim != hidden / heads
    ("qwen2", {}),
    ("qwen2", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    ("gemma", {"head_dim": 16}),
    ("gemma", {"head_dim": 32}),  # q_proj 64 -> 128: d_head decoupled from d_model / n_heads
    ("llama", {"head_dim": 8}),  # transformers' LLaMA has head_dim too
]
CASE_IDS = ["qwen2-gqa", "qwen2-mqa-tied", "gemma-gqa", "gemma-head_dim32", "llama-head_dim8"]


@pytest.mark.parametrize("family, overrides", FAMILY_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_family_logits_match_transformers(family: str, overrides: dict, seed: int) -> None:
    hf = hf_family(family, seed, **overrides)
    ours = Llama.from_hf(hf)
    head_dim = overrides.get("head_dim", 16)
    assert (ours.cfg.d_head, ours.cfg.qkv_bias) == (head_dim, family == "qwen2")
    assert ours.blocks[0].attn.q_proj.weight.shape == (4 * head_dim, 64)
    assert ours.num_parameters() == hf.num_parameters()
    x = ids(2, 40, seed=seed + 10)
    with torch.no_grad():
        expected = hf(x).logits
        got = ours(x)
    assert expected.std() > 1.0  # peaked enough that the comparisons below mean something
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, overrides", FAMILY_CASES, ids=CASE_IDS)
def test_family_greedy_generation_with_our_cache_matches_transformers(family: str, overrides: dict) -> None:
    hf = hf_family(family, seed=3, **overrides)
    ours = Llama.from_hf(hf)
    prompt = ids(2, 6, seed=4)
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    assert torch.equal(ours.generate(prompt, max_new_tokens=20), expected)
    assert len(set(expected[:, 6:].flatten().tolist())) > 3  # not one token repeated


def test_gemma_folds_its_norm_gain_and_scales_embeddings_like_transformers() -> None:
    hf = hf_family("gemma", seed=0, head_dim=16)
    ours = Llama.from_hf(hf)
    torch.testing.assert_close(ours.norm.weight, 1 + hf.model.norm.weight, rtol=0, atol=0)  # g = 1 + w
    assert ours.lm_head.weight is ours.embed.weight and ours.cfg.activation == "gelu_pytorch_tanh"
    # the scale is rounded to the model dtype first: in bf16 sqrt(48) = 6.93 becomes 6.9375
    hf48 = transformers.GemmaForCausalLM(transformers.GemmaConfig(
        vocab_size=32, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12)).to(torch.bfloat16)
    x = ids(1, 10) % 32
    with torch.no_grad():
        assert torch.equal(Llama.from_hf(hf48).embed(x), hf48.model.embed_tokens(x))


def test_qwen2_biases_load_and_its_sliding_window_caps_the_length() -> None:
    hf = hf_family("qwen2", seed=0)
    ours = Llama.from_hf(hf)
    assert torch.equal(ours.blocks[1].attn.k_proj.bias, hf.model.layers[1].self_attn.k_proj.bias)
    assert ours.blocks[0].attn.o_proj.bias is None and ours.cfg.max_seq_len == 96
    windowed = hf_family("qwen2", seed=0, use_sliding_window=True, sliding_window=32, max_window_layers=1)
    assert Llama.from_hf(windowed).cfg.max_seq_len == 32  # exact up to the window, like Mistral


def _refused(family: str) -> transformers.PreTrainedModel:
    from tiny_families import FAMILIES

    if family == "gemma2":
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8))
    if family == "gemma3":
        return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8))
    if family == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8))
    return FAMILIES[family]()


@pytest.mark.parametrize("family, match", [
    ("opt", r"OPTForCausalLM \(model_type 'opt'\) is not LLaMA-shaped: learned absolute position embeddings "
            r"instead of RoPE, LayerNorm with bias .* ReLU MLP"),
    ("gpt2", r"GPT2LMHeadModel \(model_type 'gpt2'\) is not LLaMA-shaped: learned absolute position embeddings"
             r" .* fused q/k/v projection \(c_attn\)"),
    ("gemma2", r"Gemma2ForCausalLM \(model_type 'gemma2'\) is not LLaMA-shaped: tanh soft-capping .* "
               r"alternating sliding-window and global attention, extra norms"),
    ("gemma3", r"Gemma3ForCausalLM \(model_type 'gemma3_text'\) is not LLaMA-shaped: tanh soft-capping .* "
               r"RMSNorm on queries and keys"),
    ("qwen3", r"Qwen3ForCausalLM \(model_type 'qwen3'\) is not a family Llama.from_hf knows"),
])
def test_families_of_another_shape_are_refused_by_name(family: str, match: str) -> None:
    model = _refused(family)
    with pytest.raises(ValueError, match=match) as refused:
        Llama.from_hf(model)
    assert ("Llama.from_hf converts llama, mistral, qwen2, gemma only" in str(refused.value)) == (family != "qwen3")
    assert "use a LLaMA-shaped model such as SmolLM2, Llama, Mistral, Qwen2 or Gemma" in str(refused.value)
    config = model.config  # reading the config alone refuses it the same way
    with pytest.raises(ValueError, match=rf"{type(config).__name__} \(model_type '{config.model_type}'\) is not"):
        LlamaConfig.from_hf(config)
