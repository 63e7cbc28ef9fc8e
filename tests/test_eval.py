"""Tests for effref.eval: each number is checked against a slower or an analytic computation of it."""

from __future__ import annotations

import math
import time

import pytest
import torch
import transformers
from torch import nn

from effref.eval import (
    bits_per_parameter,
    measure_generation,
    model_size_bytes,
    parameter_count,
    perplexity,
    track_memory,
)

V = 128
MiB = 1 << 20


def tiny_llama(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                      **overrides)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def hf_model() -> transformers.LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def stream() -> torch.Tensor:
    return torch.randint(0, V, (41,), generator=torch.Generator().manual_seed(1))  # (41,)


class TensorLM(nn.Module):
    """Our Llama's interface around a transformers model: logits from forward, temperature in generate."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.generate_calls: list[tuple] = []

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids).logits  # (B, T, V)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0):
        self.generate_calls.append((max_new_tokens, temperature))
        return greedy_brute_force(self.inner, input_ids, max_new_tokens)


class UniformLM(nn.Module):
    """All-zero logits: every token has probability 1/V, so the perplexity is exactly V."""

    def __init__(self, vocab: int = V):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.vocab)  # (B, T, V)


def greedy_brute_force(model: nn.Module, ids: torch.Tensor, new_tokens: int,
                       forbid: int | None = None) -> torch.Tensor:
    """Greedy decoding without a cache: a full forward over the whole sequence for every new token."""
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(ids).logits[:, -1]  # (B, V)
            if forbid is not None:
                logits[:, forbid] = -math.inf
            next_token = logits.argmax(-1)  # (B,)
            ids = torch.cat([ids, next_token[:, None]], dim=1)  # (B, T + 1)
    return ids


def brute_force_nll(model: nn.Module, ids: torch.Tensor, window: int, stride: int, bos_id: int | None,
                    max_windows: int | None) -> tuple[float, int]:
    """The protocol restated with sets: each token is scored once, from its own prefix in the first window
    that contains it with something before it; one separate forward per scored token."""
    n = len(ids)
    starts = [0] if n < window else list(range(0, n - window + 1, stride))
    starts = starts[:max_windows] if max_windows else starts
    done: set[int] = set()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in starts:
            for p in range(b, min(b + window, n)):
                if p in done or (p == b and bos_id is None):
                    continue
                prefix = ids[b:p] if bos_id is None else torch.cat([torch.tensor([bos_id]), ids[b:p]])
                logp = model(prefix[None]).logits[0, -1].double().log_softmax(-1)  # (V,)
                total -= logp[ids[p]].item()
                count += 1
                done.add(p)
    return total, count


# ---------------------------------------------------------------------------------------------- perplexity

@pytest.mark.parametrize("window, stride, bos_id, max_windows", [
    (12, None, None, None),  # disjoint windows, 5 tokens of tail dropped
    (12, 5, None, None),  # sliding windows
    (12, 12, 1, None),  # disjoint with BOS
    (12, 7, 1, None),  # sliding with BOS
    (12, 4, None, 2),  # the first two windows only
    (64, None, None, None),  # stream shorter than a window: one partial window
])
def test_perplexity_matches_per_prefix_brute_force(hf_model, stream, window, stride, bos_id, max_windows):
    total, count = brute_force_nll(hf_model, stream, window, stride or window, bos_id, max_windows)
    result = perplexity(hf_model, stream, window=window, stride=stride, bos_id=bos_id,
                        max_windows=max_windows, progress=False)
    assert result.scored_tokens == count
    assert result.nll_per_token == pytest.approx(total / count, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_nll_by_position_is_the_per_position_mean_over_windows(hf_model, stream):
    window, windows = 8, 3
    result = perplexity(hf_model, stream[: window * windows], window=window, progress=False)
    expected = torch.full((window,), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        for j in range(1, window):  # position 0 has no context and is never scored
            nlls = [-hf_model(stream[b:b + j][None]).logits[0, -1].double().log_softmax(-1)[stream[b + j]].item()
                    for b in range(0, window * windows, window)]  # one separate prefix per window
            expected[j] = sum(nlls) / windows
    torch.testing.assert_close(result.nll_by_position, expected, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("n, window, stride, bos, max_windows, windows, scored", [
    (100, 16, None, False, None, 6, 6 * 15),
    (100, 16, 8, False, None, 11, 15 + 10 * 8),
    (100, 16, 16, True, None, 6, 6 * 16),
    (100, 16, 8, True, None, 11, 16 + 10 * 8),
    (100, 16, 1, False, None, 85, 15 + 84),
    (100, 16, None, False, 2, 2, 2 * 15),
    (10, 16, None, False, None, 1, 9),
])
def test_window_and_token_counts_by_hand(n, window, stride, bos, max_windows, windows, scored):
    ids = torch.arange(n) % V  # (n,)
    result = perplexity(UniformLM(), ids, window=window, stride=stride, bos_id=0 if bos else None,
                        max_windows=max_windows, progress=False)
    assert (result.windows, result.scored_tokens) == (windows, scored)
    assert result.ppl == pytest.approx(V)  # uniform predictions: exp(ln V)


def test_describe_reads_like_the_protocol():
    ids = torch.zeros(4100, dtype=torch.long)  # (4100,)
    result = perplexity(UniformLM(), ids, window=512, max_windows=8, progress=False)
    assert result.describe() == "8 × 512-token windows (4,088 scored tokens), stride 512, no BOS"
    single = perplexity(UniformLM(), ids[:10], window=512, bos_id=0, progress=False)
    assert single.describe() == "1 × 10-token window (10 scored tokens), stride 10, BOS"


def test_batching_does_not_change_the_result(hf_model, stream):
    one = perplexity(hf_model, stream, window=8, stride=3, progress=False)
    three = perplexity(hf_model, stream, window=8, stride=3, batch_size=3, progress=False)
    assert (one.windows, one.scored_tokens) == (three.windows, three.scored_tokens)
    assert three.nll_per_token == pytest.approx(one.nll_per_token, rel=1e-6)  # float32 matmul blocking only


def test_tensor_returning_model_agrees_with_transformers(hf_model, stream):
    ours = perplexity(TensorLM(hf_model), stream, window=10, stride=4, bos_id=2, progress=False)
    theirs = perplexity(hf_model, stream, window=10, stride=4, bos_id=2, progress=False)
    assert ours == theirs


def test_training_mode_is_restored(stream):
    model = tiny_llama().train()
    perplexity(model, stream, window=16, progress=False)
    assert model.training


@pytest.mark.parametrize("kwargs, match", [
    ({"window": 1}, r"window=1 .*at least 2"),
    ({"window": 16, "stride": 0}, r"stride=0 must be in \[1, window=16\]"),
    ({"window": 16, "stride": -3}, r"stride=-3"),
    ({"window": 16, "stride": 17}, r"stride=17 must be in \[1, window=16\]"),
    ({"ids": torch.tensor([3])}, r"ids has 1 token"),
    ({"ids": torch.zeros(2, 20, dtype=torch.long)}, r"1-D .*got \(2, 20\)"),
    ({"ids": torch.zeros(20)}, r"integer token ids.*float32"),
    ({"ids": [1, 2, 3]}, r"1-D tensor .*got list"),
    ({"max_windows": 0}, r"max_windows=0"),
    ({"batch_size": 0}, r"batch_size=0"),
    ({"bos_id": -1}, r"bos_id=-1"),
])
def test_perplexity_rejects_bad_arguments(kwargs, match):
    kwargs = {"ids": torch.arange(20), "window": 8, "progress": False} | kwargs
    with pytest.raises(ValueError, match=match):
        perplexity(UniformLM(), **kwargs)


def test_unknown_model_output_is_rejected():
    class DictLM(UniformLM):
        def forward(self, input_ids):
            return {"logits": super().forward(input_ids)}

    with pytest.raises(TypeError, match="expected a logits tensor"):
        perplexity(DictLM(), torch.arange(20), window=8, progress=False)


# ---------------------------------------------------------------------------------------------- generation

@pytest.mark.filterwarnings("ignore:prefill.*decode rates:RuntimeWarning")  # timings unused
def test_generation_is_greedy_for_both_interfaces(hf_model):
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(3))  # (2, 5)
    expected = greedy_brute_force(hf_model, prompt, 4)  # (2, 9)
    eos = hf_model.generation_config.eos_token_id
    expected_no_eos = greedy_brute_force(hf_model, prompt, 4, forbid=eos)  # (2, 9)
    assert (expected != expected_no_eos).any()  # this seed's greedy path hits EOS, so both rules are seen
    hf = measure_generation(hf_model, prompt, 4, warmup=0)
    wrapped = TensorLM(hf_model)
    ours = measure_generation(wrapped, prompt, 4, warmup=1, repeats=2)
    torch.testing.assert_close(hf.output_ids, expected_no_eos, rtol=0, atol=0)  # min_new_tokens forbids EOS
    torch.testing.assert_close(ours.output_ids, expected, rtol=0, atol=0)
    assert wrapped.generate_calls == [(4, 0.0)] * 3  # warmup + 2 repeats, greedy


@pytest.mark.filterwarnings("ignore:prefill.*decode rates:RuntimeWarning")  # timings unused
def test_generation_does_not_stop_at_eos():
    model = tiny_llama()
    prompt = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(4))  # (1, 5)
    first = greedy_brute_force(model, prompt, 1)[0, -1].item()
    model.generation_config.eos_token_id = first  # transformers would stop right after one token
    result = measure_generation(model, prompt, 6, warmup=0)
    assert result.output_ids.shape == (1, 11)


class SleepyLM(UniformLM):
    """A model with known costs: every forward (prefill or decode step) sleeps STEP seconds."""

    STEP = 0.02

    def forward(self, input_ids):
        time.sleep(self.STEP)
        return super().forward(input_ids)

    def generate(self, input_ids, max_new_tokens, temperature=0.0):
        time.sleep(self.STEP * max_new_tokens)  # one prefill + (max_new_tokens - 1) decode steps
        return torch.cat([input_ids, torch.zeros(input_ids.shape[0], max_new_tokens, dtype=torch.long)], 1)


def test_generation_timings_against_a_model_with_known_costs():
    step, batch, new = SleepyLM.STEP, 3, 5
    r = measure_generation(SleepyLM(), torch.zeros(batch, 4, dtype=torch.long), new, warmup=0, repeats=3)
    assert (r.batch_size, r.prompt_len, r.new_tokens, r.repeats) == (batch, 4, new, 3)
    # the derived numbers follow the documented definitions exactly
    assert r.decode_s == pytest.approx(r.total_s - r.prefill_s)
    assert r.tokens_per_s == pytest.approx(batch * new / r.total_s)
    assert r.decode_tokens_per_s == pytest.approx(batch * (new - 1) / r.decode_s)
    assert r.per_token_latency_s == pytest.approx(r.decode_s / (new - 1))
    # sleep() never returns early; the upper bounds only allow for a busy machine
    assert step <= r.prefill_s < step + 0.5
    assert step * new <= r.total_s < step * new + 0.5
    assert r.per_token_latency_s == pytest.approx(step, abs=0.1)
    assert "batch 3, prompt 4 + 5 new tokens on cpu" in r.describe()


def test_noise_dominated_timings_are_flagged_not_invented():
    class InstantGenerate(SleepyLM):
        def generate(self, input_ids, max_new_tokens, temperature=0.0):
            return torch.zeros(input_ids.shape[0], input_ids.shape[1] + max_new_tokens, dtype=torch.long)

    with pytest.warns(RuntimeWarning, match="decode rates are meaningless"):
        r = measure_generation(InstantGenerate(), torch.zeros(1, 4, dtype=torch.long), 4, warmup=0)
    assert math.isnan(r.decode_tokens_per_s) and math.isnan(r.per_token_latency_s)
    assert r.tokens_per_s > 0


@pytest.mark.parametrize("prompt, new_tokens, kwargs, match", [
    (torch.zeros(4, dtype=torch.long), 4, {}, r"\(B, T\) .*got \(4,\).*ids\[None\]"),
    (torch.zeros(1, 0, dtype=torch.long), 4, {}, r"T >= 1, got \(1, 0\)"),
    (torch.zeros(1, 4), 4, {}, r"integer token ids.*float32"),
    (torch.zeros(1, 4, dtype=torch.long), 1, {}, r"new_tokens=1 .*new_tokens >= 2"),
    (torch.zeros(1, 4, dtype=torch.long), 4, {"repeats": 0}, r"repeats=0"),
    (torch.zeros(1, 4, dtype=torch.long), 4, {"warmup": -1}, r"warmup=-1"),
])
def test_measure_generation_rejects_bad_arguments(prompt, new_tokens, kwargs, match):
    with pytest.raises(ValueError, match=match):
        measure_generation(SleepyLM(), prompt, new_tokens, **kwargs)


# ---------------------------------------------------------------------------------------------- memory

def test_cpu_peak_is_exact_for_known_allocations():
    with track_memory("cpu") as overlapping:
        a = torch.empty(MiB, dtype=torch.uint8)
        b = torch.empty(2 * MiB, dtype=torch.uint8)
        del a, b
    with track_memory("cpu", baseline_bytes=1000) as sequential:
        a = torch.empty(MiB, dtype=torch.uint8)
        del a
        b = torch.empty(MiB // 2, dtype=torch.float32)  # 2 MiB
        del b
    assert overlapping.peak_bytes == 3 * MiB
    assert (sequential.peak_delta_bytes, sequential.peak_bytes) == (2 * MiB, 2 * MiB + 1000)


def test_cpu_peak_survives_address_reuse():
    with track_memory("cpu") as report:
        for _ in range(50):  # the allocator hands back the same address each time
            x = torch.ones(MiB, dtype=torch.uint8)
            del x
    assert report.peak_bytes == MiB


def test_views_and_in_place_ops_on_old_tensors_cost_nothing():
    x = torch.zeros(1024, 256)  # 1 MiB, created before the block
    with track_memory("cpu") as report:
        x.add_(1)
        x.view(-1)[:10].mul_(2)
        x.t()
    assert report.peak_bytes == 0
    with track_memory("cpu") as report:
        y = x * 2  # a new 1 MiB tensor
        z = torch.tensor([1.0, 2.0])  # a literal: 8 bytes
        del y, z
    assert report.peak_bytes == MiB + 8


def test_forward_peak_is_between_the_output_and_a_crude_bound(hf_model):
    B, T = 2, 32
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5))
    params = model_size_bytes(hf_model)
    with torch.inference_mode(), track_memory("cpu", baseline_bytes=params) as report:
        logits = hf_model(ids, use_cache=False).logits  # (B, T, V), alive at the end of the block
    cfg = hf_model.config
    # every intermediate is at most B·T·max(V, I) floats; a layer creates well under 30 of them
    crude = 4 * B * T * max(V, cfg.intermediate_size) * (30 * cfg.num_hidden_layers + 5)
    assert logits.nbytes <= report.peak_delta_bytes < crude
    assert report.peak_bytes == params + report.peak_delta_bytes
    assert "TorchDispatchMode" in report.method


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_matches_known_allocations():
    with track_memory("cuda") as report:
        a = torch.empty(MiB, dtype=torch.uint8, device="cuda")
        b = torch.empty(2 * MiB, dtype=torch.uint8, device="cuda")
        del a, b
    assert report.peak_delta_bytes == 3 * MiB
    assert report.peak_bytes == report.start_bytes + 3 * MiB


def test_track_memory_rejects_negative_baseline():
    with pytest.raises(ValueError, match=r"baseline_bytes=-1 must be >= 0"), track_memory("cpu", -1):
        pass


# ---------------------------------------------------------------------------------------------- size

def test_tied_embeddings_are_counted_once():
    untied, tied = tiny_llama(tie_word_embeddings=False), tiny_llama(tie_word_embeddings=True)
    H, I, kv = 64, 128, 2 * 16
    per_layer = 2 * H * H + 2 * H * kv + 3 * H * I + 2 * H  # q, o; k, v; gate, up, down; two norms
    by_hand = V * H + 2 * per_layer + H  # embedding, layers, final norm (lm_head shares the embedding)
    assert parameter_count(tied) == by_hand
    assert parameter_count(untied) == by_hand + V * H
    assert model_size_bytes(untied) - model_size_bytes(tied) == 4 * V * H


def test_quantized_buffers_are_counted_with_their_metadata():
    class Int8Linear(nn.Module):
        def __init__(self, out_f=32, in_f=64, group=16):
            super().__init__()
            self.register_buffer("codes", torch.zeros(out_f, in_f, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(out_f, in_f // group, dtype=torch.float16))
            self.register_buffer("zeros", torch.zeros(out_f, in_f // group, dtype=torch.float16))
            self.bias = nn.Parameter(torch.zeros(out_f))

    layer = Int8Linear()
    by_hand = 32 * 64 * 1 + 2 * (32 * 4 * 2) + 32 * 4  # codes, scales + zeros, fp32 bias
    assert model_size_bytes(layer) == by_hand
    assert parameter_count(layer) == 32
    assert bits_per_parameter(layer, n_params=32 * 64 + 32) == pytest.approx(8 * by_hand / (32 * 64 + 32))


def test_views_of_one_storage_and_trainable_filter():
    module = nn.Module()
    packed = torch.zeros(10, 8)  # 320 bytes
    module.register_buffer("low", packed[:5])
    module.register_buffer("high", packed[5:])
    module.lin = nn.Linear(8, 4)  # 36 parameters
    module.lin.bias.requires_grad_(False)
    module.lin2 = nn.Linear(8, 4)
    module.lin2.weight = module.lin.weight  # tied: 32 shared parameters
    assert model_size_bytes(module) == 320 + 4 * (32 + 4 + 4)
    assert parameter_count(module) == 32 + 4 + 4
    assert parameter_count(module, trainable_only=True) == 32 + 4
    assert bits_per_parameter(module) == pytest.approx(8 * (320 + 160) / 40)


@pytest.mark.parametrize("call, error, match", [
    (lambda: bits_per_parameter(nn.Linear(2, 2), n_params=0), ValueError, r"n_params=0 must be > 0"),
    (lambda: bits_per_parameter(nn.ReLU()), ValueError, r"no parameters .*pass n_params="),
    (lambda: model_size_bytes(torch.zeros(3)), TypeError, r"torch.nn.Module, got Tensor"),
    (lambda: parameter_count("model"), TypeError, r"torch.nn.Module, got str"),
])
def test_size_helpers_reject_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
