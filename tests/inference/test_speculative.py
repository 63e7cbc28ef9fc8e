"""Speculative sampling against the target distribution (chi-square tests on known distributions), greedy
speculative decoding against greedy decoding, the acceptance theory against simulation, and bad inputs.

Statistical tests: each uses a fixed seed and rejects at p < 1e-3, so with a fresh seed a correct
implementation would fail one of them with probability 0.1% each; each comes with a power check showing that a
plausible wrong rule fails the same test."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import chisquare
from torch import nn

import effref.assets
from effref.inference.drafts import layer_skip_draft
from effref.inference.speculative import (
    SpeculativeConfig,
    expected_speedup,
    expected_tokens_per_call,
    speculative_generate,
    speculative_verify,
    token_probs,
)
from effref.models.llama import KVCache

P_FAIL = 1e-3  # the false-failure rate of each statistical test


def _normalized_gamma(rows: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    x = -torch.log(torch.rand(rows, vocab, 2, generator=g)).sum(-1)  # Gamma(2, 1) as a sum of two exponentials
    return x / x.sum(-1, keepdim=True)


def emitted_tokens(p: torch.Tensor, q: torch.Tensor, trials: int, seed: int, verify=speculative_verify):
    """First and second emitted token of ``trials`` speculative steps with fixed per-position p and q."""
    g = torch.Generator().manual_seed(seed)
    first, second = [], []
    for _ in range(trials):
        drafted = torch.stack([torch.multinomial(q[i], 1, generator=g)[0] for i in range(len(q))])
        n, token = verify(p, q, drafted, g)
        out = drafted[:n].tolist() + [token]
        first.append(out[0])
        if len(out) > 1:
            second.append(out[1])
    return torch.tensor(first), torch.tensor(second)


def chi_square_p(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=len(probs)).double()
    expected = probs.double() / probs.double().sum() * len(samples)
    assert expected.min() >= 5, "too few samples for the chi-square approximation"
    return chisquare(counts.numpy(), expected.numpy()).pvalue


def test_first_and_second_tokens_follow_the_target_distribution() -> None:
    p, q = _normalized_gamma(3, 5, torch.Generator().manual_seed(0)), _normalized_gamma(2, 5,
                                                                                      torch.Generator().manual_seed(1))
    first, second = emitted_tokens(p, q, trials=4000, seed=2)
    assert chi_square_p(first, p[0]) > P_FAIL
    assert chi_square_p(second, p[1]) > P_FAIL
    assert chi_square_p(first, q[0]) < P_FAIL  # the test can tell p from q: the draft's own law fails it


def test_accepting_every_draft_fails_the_same_test() -> None:
    p, q = _normalized_gamma(3, 5, torch.Generator().manual_seed(0)), _normalized_gamma(2, 5,
                                                                                      torch.Generator().manual_seed(1))

    def no_resampling(p, q, drafted, g):  # accept by the ratio, but resample from p instead of max(0, p − q)
        n, _ = speculative_verify(p, q, drafted, g)
        return n, int(torch.multinomial(p[n], 1, generator=g))

    first, _ = emitted_tokens(p, q, trials=4000, seed=2, verify=no_resampling)
    assert chi_square_p(first, p[0]) < P_FAIL


class Bigram(nn.Module):
    """A language model with a known law: the next token depends only on the last one, via ``table``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table.log()  # (V, V) logits
        self.cfg = SimpleNamespace(vocab_size=table.shape[0], max_seq_len=64)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(1, batch_size, 1, 2, max_len)

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if cache is not None:
            cache.advance(ids.shape[1])
        return self.table[ids]  # (B, T, V)


def test_speculative_generation_samples_the_target_joint_law() -> None:
    V, new = 3, 3
    target_table = _normalized_gamma(V, V, torch.Generator().manual_seed(3))
    draft_table = _normalized_gamma(V, V, torch.Generator().manual_seed(4))
    target, draft = Bigram(target_table), Bigram(draft_table)
    prompt = torch.tensor([[1]])
    exact = torch.zeros(V ** new, dtype=torch.float64)  # P(x1, x2, x3 | x0 = 1) under the target
    for code in range(V ** new):
        seq = [1] + [(code // V ** (new - 1 - i)) % V for i in range(new)]
        exact[code] = torch.prod(torch.stack([target_table[a, b] for a, b in itertools.pairwise(seq)]))
    g = torch.Generator().manual_seed(5)
    codes = []
    for _ in range(3000):
        out = speculative_generate(target, draft, prompt, new, SpeculativeConfig(gamma=2), generator=g)
        codes.append(sum(int(t) * V ** (new - 1 - i) for i, t in enumerate(out.new_tokens)))
    assert chi_square_p(torch.tensor(codes), exact) > P_FAIL


def test_measured_tokens_per_call_matches_the_theory() -> None:
    """With context-free p and q, α = Σ min(p, q) exactly and acceptances are i.i.d.: Eq. 1 must hold."""
    p1, q1 = _normalized_gamma(1, 6, torch.Generator().manual_seed(6))[0], _normalized_gamma(
        1, 6, torch.Generator().manual_seed(7))[0]
    gamma, g = 3, torch.Generator().manual_seed(8)
    p, q = p1.expand(gamma + 1, -1), q1.expand(gamma, -1)
    emitted = []
    for _ in range(5000):
        drafted = torch.multinomial(q1, gamma, replacement=True, generator=g)
        emitted.append(speculative_verify(p, q, drafted, g)[0] + 1)
    alpha = float(torch.minimum(p1, q1).sum())
    mean, sd = torch.tensor(emitted, dtype=torch.float64).mean(), torch.tensor(emitted, dtype=torch.float64).std()
    assert abs(mean - expected_tokens_per_call(alpha, gamma)) < 4 * sd / 5000 ** 0.5  # |z| < 4
    assert expected_tokens_per_call(1.0, gamma) == gamma + 1 and expected_tokens_per_call(0.0, gamma) == 1
    assert expected_speedup(0.8, 4, 0.0) == pytest.approx(expected_tokens_per_call(0.8, 4))


@pytest.mark.parametrize("draft_layers", [1, 2])
def test_greedy_speculative_decoding_is_greedy_decoding(tiny_llama, random_ids, draft_layers: int) -> None:
    model = tiny_llama()
    draft = layer_skip_draft(model, draft_layers)
    for seed in range(3):
        prompt = random_ids(1, 5 + seed, seed=seed)
        result = speculative_generate(model, draft, prompt, 30, SpeculativeConfig(gamma=3, temperature=0))
        assert torch.equal(result.tokens, model.generate(prompt, 30))
        assert 1 <= result.tokens_per_call <= 4


def test_perfect_draft_accepts_everything(tiny_llama, random_ids) -> None:
    model = tiny_llama()
    result = speculative_generate(model, model, random_ids(1, 4), 20, SpeculativeConfig(gamma=4, temperature=0))
    assert result.emitted == [5, 5, 5, 5] and result.alpha == 1.0


def test_eos_stops_generation(tiny_llama, random_ids) -> None:
    model = tiny_llama()
    prompt = random_ids(1, 5)
    reference = model.generate(prompt, 30)[0, 5:].tolist()
    eos = reference[6]
    result = speculative_generate(model, layer_skip_draft(model, 2), prompt, 30,
                                  SpeculativeConfig(gamma=3, temperature=0), eos_id=eos)
    assert result.new_tokens.tolist() == reference[:reference.index(eos) + 1]


@pytest.mark.parametrize("kwargs, message", [
    ({"gamma": 0}, "gamma=0"),
    ({"gamma": -2}, "gamma=-2"),
    ({"gamma": 2.5}, "gamma=2.5"),
    ({"temperature": -1.0}, "temperature=-1.0"),
])
def test_bad_configs_are_rejected(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig(**kwargs)


@pytest.mark.parametrize("args, message", [
    ((1.0, None, 0.0), r"top_p=0.0 must lie in \(0, 1\]"),  # would divide 0 by 0: NaN rows
    ((-1.0,), "temperature=-1.0 must be >= 0"),  # would turn the distribution upside down
    ((1.0, 0), "top_k=0 must be an integer >= 1"),  # would index the 0-th largest of nothing
    ((1.0, 2.5), "top_k=2.5 must be an integer >= 1"),
    ((1.0, None, 1.5), r"top_p=1.5 must lie in \(0, 1\]"),
])
def test_token_probs_refuses_bad_sampling_parameters(args, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        token_probs(torch.randn(2, 8), *args)


def test_mismatched_vocabularies_are_rejected(tiny_llama, random_ids) -> None:
    with pytest.raises(ValueError, match="draft vocab_size=32 differs from target vocab_size=64"):
        speculative_generate(tiny_llama(), tiny_llama(vocab=32), random_ids(1, 4, vocab=32), 5)


def test_bad_verify_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="need p"):
        speculative_verify(torch.rand(2, 5), torch.rand(2, 5), torch.tensor([0, 1]))


@pytest.mark.slow
def test_greedy_speculative_on_smollm2_equals_greedy_decoding() -> None:
    if not effref.assets.is_available("smollm2-135m"):
        pytest.skip("SmolLM2-135M is not fetched (python -m effref.assets fetch smollm2-135m)")
    from effref.models import load_model

    model, tokenizer, _ = load_model("smollm2-135m", impl="effref")
    prompt = torch.tensor([tokenizer.encode("Emma Woodhouse, handsome, clever, and rich, with a comfortable")])
    reference = model.generate(prompt, 24)
    result = speculative_generate(model, layer_skip_draft(model, 20), prompt, 24,
                                  SpeculativeConfig(gamma=3, temperature=0))
    assert torch.equal(result.tokens, reference)
