"""KV-cache quantization: error bound per element, exact byte count, streaming = one shot, model-level use."""

import math

import pytest
import torch

from effref.models import load_model
from effref.models.llama import KVCache, Llama
from effref.quantization.kv_cache import (
    KVQuantConfig,
    QuantizedKVCache,
    WithQuantizedKV,
    cache_nbytes,
    quantize_kv,
    quantized_cache,
)

B, N_KV, D, L = 2, 3, 16, 4


def _kv(T: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N_KV, T, D, generator=gen)
    return x * torch.logspace(-1, 1, T)[None, None, :, None] + 0.5  # tokens of different scales, off-centre


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("granularity", ["head", "token"])
def test_error_is_at_most_half_a_step(bits, granularity):
    cfg = KVQuantConfig(bits=bits, granularity=granularity)
    cache = QuantizedKVCache(L, B, N_KV, D, 12, cfg)
    k, v = _kv(12, 0), _kv(12, 1)
    k_hat, v_hat = cache.update(0, k, v)
    for x, x_hat in ((k, k_hat), (v, v_hat)):
        q = quantize_kv(x, cfg)
        step = q.scale.float().view(B, N_KV, 12, 1) if granularity == "head" else \
            q.scale.float().view(B, 1, 12, 1)  # (…, 1) broadcast over the row's channels
        # s/2 from rounding, plus the fp16 rounding of s (relative 2⁻¹¹) over at most 2^b − 1 steps
        bound = step * (0.5 + (2 ** bits - 1) * 2.0 ** -11) * (1 + 1e-6)
        assert ((x - x_hat).abs() <= bound).all()
    assert (k - k_hat).abs().max() > 0


@pytest.mark.parametrize("bits, granularity, symmetric", [(8, "head", False), (4, "head", False),
                                                           (4, "token", False), (8, "token", True)])
def test_bytes_are_counted_exactly(bits, granularity, symmetric):
    max_len = 10
    cache = QuantizedKVCache(L, B, N_KV, D, max_len, KVQuantConfig(bits, granularity, symmetric))
    groups = B * max_len * (N_KV if granularity == "head" else 1)  # one (scale, zero) per group
    per_layer_and_side = B * N_KV * max_len * D * bits // 8 + groups * (2 + (0 if symmetric else 1))
    assert cache.nbytes == cache_nbytes(cache) == 2 * L * per_layer_and_side
    float16 = KVCache(L, B, N_KV, D, max_len, dtype=torch.float16)
    assert cache_nbytes(float16) == 2 * L * B * N_KV * max_len * D * 2
    if (bits, granularity, symmetric) == (4, "head", False):  # 0.5 byte + 3/16 byte per element vs 2 bytes
        assert cache_nbytes(float16) / cache.nbytes == pytest.approx(2 / (0.5 + 3 / 16))


def test_streaming_one_token_at_a_time_equals_one_shot():
    cfg = KVQuantConfig(bits=4, granularity="token")
    k, v = _kv(9, 0), _kv(9, 1)
    one_shot = QuantizedKVCache(L, B, N_KV, D, 9, cfg)
    k1, v1 = one_shot.update(2, k, v)
    stream = QuantizedKVCache(L, B, N_KV, D, 9, cfg)
    for t in range(9):
        k2, v2 = stream.update(2, k[:, :, t:t + 1], v[:, :, t:t + 1])
        stream.advance(1)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)


@pytest.fixture(scope="module")
def tiny():
    return Llama.from_hf(load_model("tiny-llama").model)


def test_model_decodes_through_the_quantized_cache(tiny):
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    full = tiny(ids)
    errors = {}
    for bits in (8, 4):
        cfg = KVQuantConfig(bits=bits)
        cache = quantized_cache(tiny, 2, 20, cfg)
        assert isinstance(cache, KVCache)
        steps = [tiny(ids[:, :12], cache)] + [tiny(ids[:, t:t + 1], cache) for t in range(12, 20)]
        decoded = torch.cat(steps, dim=1)  # (2, 20, V): prefill then eight single-token steps
        torch.testing.assert_close(decoded, WithQuantizedKV(tiny, cfg)(ids), atol=1e-5, rtol=1e-5)
        errors[bits] = (decoded - full).abs().max().item()
    assert 0 < errors[8] < errors[4] < 0.5


def test_truncate_and_reset_follow_the_float_cache_protocol(tiny):
    cache = quantized_cache(tiny, 1, 16, KVQuantConfig(bits=8))
    ids = torch.randint(0, 256, (1, 10))
    tiny(ids, cache)
    cache.truncate(6)
    again = tiny(ids[:, 6:], cache)
    torch.testing.assert_close(again, WithQuantizedKV(tiny, KVQuantConfig(bits=8))(ids)[:, 6:], atol=1e-5, rtol=1e-5)
    cache.reset()
    assert cache.length == 0


BAD = [
    (lambda: KVQuantConfig(bits=1), ValueError, r"bits=1 is not supported"),
    (lambda: KVQuantConfig(granularity="channel"), ValueError, r"granularity='channel' is not known"),
    (lambda: QuantizedKVCache(1, 1, 1, 6, 4, KVQuantConfig(bits=3)), ValueError,
     r"d_head=6 · bits=3 is not a whole number of bytes"),
    (lambda: QuantizedKVCache(1, 1, 1, 8, 4, cfg=None), TypeError, r"cfg must be a KVQuantConfig"),
    (lambda: QuantizedKVCache(1, 1, 1, 8, 4, KVQuantConfig()).update(0, torch.ones(1, 1, 5, 8),
                                                                     torch.ones(1, 1, 5, 8)), ValueError,
     r"KV cache overflow: 0 cached \+ 5 new tokens > max_len=4"),
    (lambda: quantize_kv(torch.ones(4, 8), KVQuantConfig()), ValueError, r"x must be \(B, n_kv_heads, T, d_head\)"),
    (lambda: quantized_cache(load_model("tiny-llama").model, 1, 8, KVQuantConfig()), TypeError,
     r"model must be an effref\.models\.llama\.Llama"),
    (lambda: quantized_cache(Llama.from_hf(load_model("tiny-llama").model), 0, 8, KVQuantConfig()), ValueError,
     r"batch_size=0"),
]


@pytest.mark.parametrize("make, error, message", BAD)
def test_bad_arguments_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_smollm2_shapes_save_what_the_chapter_says():
    # SmolLM2-135M: 30 layers, 3 kv heads of 64; int4 per head = 0.5 + 3/64 bytes per element vs 2 (fp16)
    cache = QuantizedKVCache(30, 1, 3, 64, 2048, KVQuantConfig(bits=4), device="meta")
    fp16 = 2 * 30 * 3 * 2048 * 64 * 2
    assert math.isclose(fp16 / cache.nbytes, 2 / (0.5 + 3 / 64))


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_other_llama_shaped_families_decode_through_the_quantized_cache(family):
    from tiny_families import FAMILIES

    torch.manual_seed(0)
    model = Llama.from_hf(FAMILIES[family]().eval())  # Qwen2: q/k/v biases; Gemma: head_dim 16 ≠ 64 / 4
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = quantized_cache(model, 1, 16, KVQuantConfig(bits=8))
        decoded = torch.cat([model(ids[:, :10], cache)] + [model(ids[:, t:t + 1], cache) for t in range(10, 16)], 1)
    assert 0 < (decoded - full).abs().max() < 0.05 * full.abs().max()


def test_a_transformers_model_is_refused_with_the_conversion():
    from tiny_families import FAMILIES

    with pytest.raises(TypeError, match=r"convert a LLaMA, Mistral, Qwen2 or Gemma model with Llama\.from_hf"):
        quantized_cache(FAMILIES["qwen2"](), 1, 16, KVQuantConfig(bits=8))
