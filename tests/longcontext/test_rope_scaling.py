"""Scaled RoPE (PI, NTK, dynamic NTK, YaRN) against transformers' own functions and models, and the identities
each method promises."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from effref.longcontext.rope_scaling import (RopeScaling, hf_rope_kwargs, ntk_theta,
                                             rope_inv_freq, scaled_inv_freq, scaled_rope_tables, scaling_from_hf,
                                             use_rope_scaling, yarn_keep)
from effref.models.llama import Llama, LlamaConfig, rope_tables

# (d_head, θ, s, L): LLaMA-2-like, a long-base model, a fractional factor, and the chapter's tiny model
SETTINGS = [(128, 10000.0, 4.0, 4096), (64, 500000.0, 8.0, 2048), (128, 10000.0, 2.5, 4096), (32, 10000.0, 8.0, 128)]


def hf_config(scaling: RopeScaling, theta: float, d_head: int, **extra) -> HFLlamaConfig:
    return HFLlamaConfig(hidden_size=4 * d_head, num_attention_heads=4, head_dim=d_head,
                         **hf_rope_kwargs(scaling, theta, d_head), **extra)


@pytest.mark.parametrize("kind", ["linear", "yarn", "llama3"])
@pytest.mark.parametrize("d_head, theta, s, L", SETTINGS)
def test_inv_freq_and_attention_factor_equal_transformers(kind, d_head, theta, s, L):
    scaling = RopeScaling(kind, s, original_len=L)
    expected, expected_factor = ROPE_INIT_FUNCTIONS[kind](hf_config(scaling, theta, d_head), None)
    ours, factor = scaled_inv_freq(d_head, theta, scaling)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-12)


@pytest.mark.parametrize("d_head, theta, s, L", SETTINGS)
@pytest.mark.parametrize("length_over_L", [0.5, 1.0, 3.0, 8.0])
def test_dynamic_ntk_equals_transformers_at_every_length(d_head, theta, s, L, length_over_L):
    scaling = RopeScaling("dynamic", s, original_len=L)
    seq_len = int(length_over_L * L)
    expected, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config(scaling, theta, d_head), None, seq_len=seq_len)
    ours, factor = scaled_inv_freq(d_head, theta, scaling, seq_len=seq_len)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    assert factor == 1.0
    if seq_len <= L:  # no change inside the trained context
        torch.testing.assert_close(ours, rope_inv_freq(d_head, theta), rtol=0, atol=0)


@pytest.mark.parametrize("d_head, theta, s, L", SETTINGS)
def test_ntk_keeps_the_fastest_pair_and_divides_the_slowest_by_s(d_head, theta, s, L):
    base = rope_inv_freq(d_head, theta)
    ntk, _ = scaled_inv_freq(d_head, theta, RopeScaling("ntk", s))
    assert ntk[0] == base[0] == 1.0
    torch.testing.assert_close(ntk[-1], base[-1] / s, rtol=1e-5, atol=0)
    ratio = ntk / base  # falls from 1 to 1/s: every pair in between is interpolated by less than s
    assert (ratio[1:] < ratio[:-1]).all() and (ratio >= 1 / s - 1e-6).all()
    # static NTK is transformers' dynamic NTK at factor 1 and length s·L
    expected, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_config(RopeScaling("dynamic", 1.0, original_len=L), theta,
                                                           d_head), None, seq_len=int(s * L))
    torch.testing.assert_close(ntk, expected, rtol=1e-6, atol=0)


def test_position_interpolation_reads_position_m_as_m_over_s():
    s = 4.0
    cos, sin = scaled_rope_tables(16, 64, 10000.0, RopeScaling("linear", s))
    base_cos, base_sin = rope_tables(16, 16, 10000.0)  # positions 0..15 = m / s for m = 0, 4, …, 60
    torch.testing.assert_close(cos[::4], base_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[::4], base_sin, rtol=0, atol=1e-6)
    angle = torch.atan2(sin[:8, 0], cos[:8, 0])  # the fastest pair (θ_0 = 1 radian per position) …
    torch.testing.assert_close(angle, torch.arange(8) / s, rtol=0, atol=1e-6)  # … turns 1/s per position


def test_yarn_interpolates_slow_pairs_and_keeps_fast_ones():
    d, theta, L, s = 64, 10000.0, 2048, 8.0
    scaling = RopeScaling("yarn", s, original_len=L)
    keep = yarn_keep(d, theta, scaling)
    turns = L * rope_inv_freq(d, theta) / (2 * math.pi)  # r_i, turns of pair i over the trained context
    assert (keep[turns > 32] == 1).all() and (keep[turns < 1] == 0).all()
    assert ((keep[1:] <= keep[:-1]).all() and 0 < keep[(turns > 1) & (turns < 32)].mean() < 1)
    inv_freq, mscale = scaled_inv_freq(d, theta, scaling)
    assert mscale == pytest.approx(0.1 * math.log(8.0) + 1)
    cos, sin = scaled_rope_tables(d, 16, theta, scaling)
    torch.testing.assert_close(cos.pow(2) + sin.pow(2), torch.full((16, d), mscale**2))  # temperature on q and k


@pytest.mark.parametrize("scaling", [
    RopeScaling("linear", 4.0, original_len=16), RopeScaling("ntk", 4.0, original_len=16),
    RopeScaling("dynamic", 4.0, original_len=16), RopeScaling("yarn", 4.0, original_len=16),
    RopeScaling("yarn", 3.0, original_len=16, beta_fast=8.0, beta_slow=2.0, attention_factor=1.3, truncate=False),
    RopeScaling("llama3", 4.0, original_len=16, low_freq_factor=0.5, high_freq_factor=2.0),
], ids=["linear", "ntk", "dynamic", "yarn", "yarn-options", "llama3"])
def test_our_scaled_llama_equals_transformers_configured_with_the_same_scaling(scaling, make_ids):
    torch.manual_seed(0)
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, rms_norm_eps=1e-6)
    hf_plain = LlamaForCausalLM(HFLlamaConfig(**base, max_position_embeddings=16,
                                              rope_parameters={"rope_type": "default", "rope_theta": 100.0})).eval()
    ours = use_rope_scaling(Llama.from_hf(hf_plain), scaling, max_len=64)
    hf_scaled = LlamaForCausalLM(HFLlamaConfig(**base, **hf_rope_kwargs(scaling, 100.0, 8))).eval()
    hf_scaled.load_state_dict(hf_plain.state_dict())
    x = make_ids(64)  # four times the trained 16 positions
    with torch.no_grad():
        expected, got = hf_scaled(x).logits, ours(x)
        plain = hf_plain(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the scaling did change the model
    # and back: the transformers config reads as the same scaling, and Llama.from_hf converts it to the same model
    if scaling.kind != "ntk":  # NTK is the default type with another base in transformers
        read = scaling_from_hf(hf_scaled.config)  # linear needs no original length, and transformers has none
        assert read == (dataclasses.replace(scaling, original_len=None) if scaling.kind == "linear" else scaling)
    converted = Llama.from_hf(hf_scaled)
    if scaling.kind == "dynamic":  # built for max_position_embeddings = L, where nothing is scaled yet
        assert converted.cfg.max_seq_len == 16
        use_rope_scaling(converted, converted.cfg.rope_scaling, max_len=64)  # rebuilt for the length we run at
    n = converted.cfg.max_seq_len  # s·L from the config (yarn-options: 48); causal, so a prefix compares
    with torch.no_grad():
        torch.testing.assert_close(converted(x[:, :n]), expected[:, :n], rtol=1e-5, atol=1e-5)


def test_no_scaling_restores_the_trained_model(make_llama, make_ids):
    model = make_llama()
    x = make_ids(40)
    with torch.no_grad():
        before = model(x)
        use_rope_scaling(model, RopeScaling("yarn", 4.0, original_len=16), max_len=256)
        assert model.cfg.max_seq_len == 256 and not torch.allclose(model(x), before)
        use_rope_scaling(model, RopeScaling(), max_len=64)
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_a_bf16_model_keeps_bf16_tables(make_llama, make_ids):
    model = make_llama().to(torch.bfloat16)
    use_rope_scaling(model, RopeScaling("yarn", 4.0, original_len=64), max_len=256)
    assert model.rope_cos.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(make_ids(200)).dtype == torch.bfloat16


def test_ntk_theta_formula():
    assert ntk_theta(10000.0, 128, 4.0) == pytest.approx(10000.0 * 4.0 ** (128 / 126))


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "ntk", "factor": 0.5}, "factor=0.5 must be a number >= 1"),
    ({"kind": "linear", "factor": "2"}, "factor='2' must be a number"),
    ({"kind": "yarn", "factor": 4.0}, "needs original_len"),
    ({"kind": "dynamic", "factor": 2.0, "original_len": 0}, "original_len=0 must be a positive integer"),
    ({"kind": "yarn", "factor": 2.0, "original_len": -5}, "original_len=-5 must be a positive integer"),
    ({"kind": "ntk-by-parts", "factor": 2.0}, "kind='ntk-by-parts' is not known"),
    ({"kind": "yarn", "factor": 2.0, "original_len": 64, "beta_fast": 1.0, "beta_slow": 2.0}, "beta_slow"),
    ({"kind": "yarn", "factor": 2.0, "original_len": 64, "attention_factor": 0.0}, "attention_factor=0.0"),
])
def test_bad_scalings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        RopeScaling(**kwargs)


def test_bad_table_arguments_are_refused_by_name(make_llama):
    with pytest.raises(ValueError, match="d_head=7 must be an even integer"):
        rope_inv_freq(7, 10000.0)
    with pytest.raises(ValueError, match="theta=1.0 must be a finite RoPE base > 1"):
        rope_inv_freq(8, 1.0)
    with pytest.raises(ValueError, match="max_len=0 must be a positive integer"):
        scaled_rope_tables(8, 0, 10000.0, RopeScaling())
    with pytest.raises(TypeError, match="scaling must be a RopeScaling"):
        use_rope_scaling(make_llama(), {"kind": "linear"}, 64)
    with pytest.raises(ValueError, match="rope_type 'longrope'"):
        scaling_from_hf(HFLlamaConfig(rope_parameters={"rope_type": "longrope", "factor": 8.0, "rope_theta": 1e4,
                                                       "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                                                       "original_max_position_embeddings": 8192}))


def test_a_config_with_a_scaling_that_is_not_a_rope_scaling_is_refused():
    with pytest.raises(TypeError, match="rope_scaling must be a RopeScaling, got dict"):
        LlamaConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=32,
                    rope_scaling={"kind": "linear", "factor": 2.0})


def test_a_llama_built_with_a_scaling_equals_one_scaled_afterwards(make_llama, make_ids):
    scaling = RopeScaling("yarn", 4.0, original_len=16)
    after = use_rope_scaling(make_llama(), scaling, max_len=64)
    built = make_llama(rope_scaling=scaling)
    assert built.cfg == after.cfg
    with torch.no_grad():
        torch.testing.assert_close(built(make_ids(64)), after(make_ids(64)), rtol=0, atol=0)
