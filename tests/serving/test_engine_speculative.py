"""Speculative decoding inside the engine: greedy output identical to plain greedy decoding, sampled output
distributed as the target's own samples (chi-square against exact marginals), exact lengths, rejected drafts
rolled back out of the block tables, and clear errors."""

import copy

import pytest
import torch
from scipy.stats import chisquare

from effref.inference.drafts import layer_skip_draft
from effref.models import load_model
from effref.models.llama import Llama, LlamaConfig
from effref.serving import Engine

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    """tiny-llama with its block weights scaled up 10×: the random model at its own scale just repeats the
    last token, which any draft guesses; scaled, its greedy continuations vary token to token."""
    m = load_model("tiny-llama", impl="effref", seed=0).model
    with torch.no_grad():
        for p in m.blocks.parameters():
            if p.ndim == 2:
                p.mul_(10)
    return m


@pytest.fixture(scope="module")
def drafts(model):
    noisy = copy.deepcopy(model)  # the target with noise on every weight: accepts some drafts, rejects others
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.5)
    return {"self": model, "noisy": noisy, "layer_skip": layer_skip_draft(model, 1)}


@pytest.fixture(scope="module")
def requests():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 17, 33, 1, 40, 16, 9]
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths], [7, 20, 3, 12, 9, 30, 1]


def alone(model, prompt, n, eos_id=None):
    return model.generate(torch.tensor([prompt]), n, eos_id=eos_id)[0, len(prompt):].tolist()


def checked_steps(engine):
    """Wrap ``engine.step``: after every step each running table holds exactly the tokens whose keys/values
    are valid, in the fewest blocks, and the reference counts match the tables (nothing leaked)."""
    record, step = [], engine.step

    def watch():
        record.append(step())
        m, held = engine.manager, []
        for seq in engine.scheduler.running:
            assert seq.table.tokens == seq.tokens[:-1] and seq.num_computed == len(seq.tokens) - 1
            assert len(seq.table.blocks) == m.blocks_needed(len(seq.tokens) - 1)
            held += seq.table.blocks
        assert all(m.allocator.refcount[b] == held.count(b) for b in range(m.allocator.num_blocks))
        assert m.num_free == m.allocator.num_blocks - len(set(held))
        return record[-1]
    engine.step = watch
    return record


@pytest.mark.parametrize("draft", ["self", "noisy", "layer_skip"])
@pytest.mark.parametrize("num_blocks,block_size,max_batch", [(128, 4, 8), (14, 4, 7), (60, 1, 7)])
def test_speculative_engine_output_equals_greedy_decoding(model, drafts, requests, draft, num_blocks, block_size,
                                                          max_batch):
    prompts, lengths = requests
    engine = Engine(model, num_blocks=num_blocks, block_size=block_size, max_batch=max_batch,
                    draft=drafts[draft], gamma=3)
    checked_steps(engine)
    out = engine.generate(prompts, lengths)
    assert out == [alone(model, p, n) for p, n in zip(prompts, lengths)]
    plain = Engine(model, num_blocks=num_blocks, block_size=block_size, max_batch=max_batch)
    assert out == plain.generate(prompts, lengths)
    drafter = engine.drafter
    assert engine.manager.num_free == num_blocks and not drafter.tables
    assert drafter.manager.num_free == drafter.manager.allocator.num_blocks  # the draft's pool is whole again
    stats = engine.speculation_stats()
    assert stats["target_steps"] == engine.steps and stats["verifications"] > 0
    if draft == "self":  # a perfect draft: every draft accepted, far fewer target steps
        assert stats["acceptance_rate"] == 1.0 and engine.steps < plain.steps
    if draft == "noisy":  # the rollback path really runs
        assert 0 < stats["acceptance_rate"] < 1


@pytest.mark.parametrize("draft_blocks", [3, 6, 12])
def test_a_small_draft_pool_means_fewer_drafts_not_other_tokens(model, drafts, requests, draft_blocks):
    prompts, lengths = requests  # prompts of up to 40 tokens: with 4-token blocks some cannot draft at all
    engine = Engine(model, num_blocks=128, block_size=4, max_batch=7, draft=drafts["self"], gamma=3,
                    draft_blocks=draft_blocks)
    checked_steps(engine)
    out = engine.generate(prompts, lengths)
    assert out == [alone(model, p, n) for p, n in zip(prompts, lengths)]
    stats = engine.speculation_stats()  # the draft is the target: a stale draft cache would show as a rejection
    assert stats["verifications"] > 0 and stats["acceptance_rate"] == 1.0
    assert engine.drafter.manager.num_free == draft_blocks and not engine.drafter.tables


def test_speculation_runs_under_preemption(model, drafts, requests):
    prompts, lengths = requests
    engine = Engine(model, num_blocks=14, block_size=4, max_batch=7, draft=drafts["noisy"], gamma=3)
    steps, schedule = [], engine.scheduler.schedule
    engine.scheduler.schedule = lambda: steps.append(schedule()) or steps[-1]
    checked_steps(engine)
    out = engine.generate(prompts, lengths)
    assert any(s.preempted for s in steps), "the tiny pool should have forced at least one preemption"
    assert out == [alone(model, p, n) for p, n in zip(prompts, lengths)]


@pytest.mark.parametrize("gamma", [1, 4, 9])
def test_max_new_tokens_and_eos_are_exact_when_several_tokens_are_accepted(model, requests, gamma):
    prompts, _ = requests
    lengths = [1, 2, 3, 5, 8, 13, 21]
    engine = Engine(model, num_blocks=128, block_size=4, draft=model, gamma=gamma)  # accepts every draft
    out = engine.generate(prompts, lengths)
    assert [len(o) for o in out] == lengths and out == [alone(model, p, n) for p, n in zip(prompts, lengths)]
    eos = alone(model, prompts[5], 21)[6]  # a token the longest request emits mid-way
    out = engine.generate(prompts, 21, eos_id=eos)
    ref = [alone(model, p, 21, eos_id=eos) for p in prompts]
    ref = [r[:r.index(eos) + 1] if eos in r else r for r in ref]  # Llama.generate pads finished rows with EOS
    assert out == ref and len(out[5]) == 7
    assert engine.manager.num_free == 128


def test_serve_and_stream_with_a_draft(model, drafts, requests):
    prompts, lengths = requests
    engine = Engine(model, num_blocks=64, block_size=4, max_batch=4, draft=drafts["noisy"], gamma=2)
    done = engine.serve([(0.001 * i, p, n) for i, (p, n) in enumerate(zip(prompts, lengths))])
    for seq, p, n in zip(done, prompts, lengths):
        assert seq.output == alone(model, p, n) and seq.first_token_time <= seq.finish_time
    events = list(engine.stream(prompts, lengths))
    assert len(events) == sum(lengths) and [t for r, t in events if r == 5] == alone(model, prompts[5], 30)


@pytest.mark.parametrize("call,error,message", [
    (lambda m: Engine(m, draft=m, gamma=0), ValueError, "gamma=0"),
    (lambda m: Engine(m, draft=m, gamma=-2), ValueError, "gamma=-2"),
    (lambda m: Engine(m, draft=m, gamma=2.5), ValueError, "gamma=2.5"),
    (lambda m: Engine(m, draft=Llama(LlamaConfig(vocab_size=128, d_model=64, n_layers=1, n_heads=4,
                                                  n_kv_heads=2, d_ff=128))),
     ValueError, "draft vocab_size=128 differs from target vocab_size=256"),
    (lambda m: Engine(m, draft=torch.nn.Linear(2, 2)), TypeError, "layer_skip_draft"),
    (lambda m: Engine(m, draft=m).generate([[1, 2]], 3, temperature=0.7, top_k=0), ValueError, "top_k=0"),
    (lambda m: Engine(m, draft=m).generate([[1, 2]], 3, temperature=0.7, top_p=0.0), ValueError, "top_p=0.0"),
    (lambda m: Engine(m).generate([[1, 2]], 3, temperature=0.7, top_p=1.5), ValueError, r"top_p=1.5 must lie in \(0, 1\]"),
])
def test_bad_speculative_arguments_are_reported(model, call, error, message):
    with pytest.raises(error, match=message):
        call(model)


# --- speculative sampling: the emitted tokens follow the target's law --------------------------------------------

def small_vocab_model(seed: int) -> Llama:
    """A random 8-token model whose output layer is scaled up, so its next-token laws are far from uniform."""
    torch.manual_seed(seed)
    m = Llama(LlamaConfig(vocab_size=8, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                          max_seq_len=64)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(8)
    return m


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None = None,
                   ) -> torch.Tensor:
    """softmax(logits / T), keeping the k most likely tokens, then the fewest most likely whose mass reaches p:
    written out row by row with a loop, independently of token_probs."""
    probs = (logits.double() / temperature).softmax(-1)  # (R, V)
    out = torch.zeros_like(probs)
    for r, row in enumerate(probs):
        order = row.argsort(descending=True).tolist()[:top_k or len(row)]
        kept, mass = [], row[order].sum()
        for i in order:  # most likely first
            if top_p is not None and kept and sum(row[j] for j in kept) / mass >= top_p:
                break
            kept.append(i)
        out[r, kept] = row[kept] / row[kept].sum()
    return out


@torch.no_grad()
def exact_marginals(model: Llama, prompt: list[int], n_new: int, temperature: float, top_k: int | None,
                    top_p: float | None = None) -> list[torch.Tensor]:
    """P(x_t = v) for t = 1..n_new when sampling ``model`` alone: enumerate every prefix (V^(t−1) of them)."""
    V = model.cfg.vocab_size
    prefixes, weight, marginals = torch.tensor([prompt]), torch.ones(1, dtype=torch.float64), []
    for _ in range(n_new):
        probs = filtered_probs(model(prefixes)[:, -1], temperature, top_k, top_p)  # (prefixes, V)
        joint = weight[:, None] * probs  # (prefixes, V) P(prefix, next token)
        marginals.append(joint.sum(0))
        prefixes = torch.cat([prefixes.repeat_interleave(V, 0), torch.arange(V).repeat(len(prefixes))[:, None]], 1)
        weight = joint.flatten()
    return marginals


def chi_square_p(tokens: list[int], probs: torch.Tensor) -> float:
    """Goodness of fit of ``tokens`` to ``probs``; 0 when a token of probability 0 (filtered by top-k) appears."""
    support = probs > 0
    counts = torch.bincount(torch.tensor(tokens), minlength=len(probs)).double()
    if counts[~support].sum() > 0:
        return 0.0
    expected = probs[support] * len(tokens)
    assert expected.min() >= 5, "too few samples for the chi-square approximation"
    return chisquare(counts[support].numpy(), expected.numpy()).pvalue


@pytest.mark.parametrize("top_k, top_p", [(None, None), (4, None), (None, 0.7)])
def test_speculative_sampling_in_the_engine_follows_the_target_distribution(top_k, top_p):
    target, draft = small_vocab_model(0), small_vocab_model(1)
    prompt, n_new, n_requests, temperature = [1, 2, 3], 4, 1500, 1.0
    engine = Engine(target, num_blocks=256, block_size=4, max_batch=64, draft=draft, gamma=3)
    out = engine.generate([prompt] * n_requests, n_new, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=0)
    exact = exact_marginals(target, prompt, n_new, temperature, top_k, top_p)
    for t in range(1, n_new):  # position 0 comes from the prefill's plain sample; the rest from verification
        assert chi_square_p([o[t] for o in out], exact[t]) > 1e-3, f"position {t}"
    wrong = exact_marginals(draft, prompt, n_new, temperature, top_k, top_p)[1]
    assert chi_square_p([o[1] for o in exact_samples(wrong, n_requests)], exact[1]) < 1e-3  # the test has power
    stats = engine.speculation_stats()
    assert 0.2 < stats["acceptance_rate"] < 0.95, stats  # drafts are both accepted and rejected: both paths run
    assert engine.manager.num_free == 256


def exact_samples(probs: torch.Tensor, n: int) -> list[list[int]]:
    """n draws from ``probs`` shaped like engine output rows (only position 1 is filled)."""
    draws = torch.multinomial(probs.float(), n, replacement=True, generator=torch.Generator().manual_seed(0))
    return [[0, int(x)] for x in draws]


def test_a_perfect_draft_is_always_accepted_when_sampling():
    target = small_vocab_model(0)
    engine = Engine(target, num_blocks=64, block_size=4, draft=target, gamma=3)
    out = engine.generate([[1, 2, 3]] * 8, 9, temperature=0.8, seed=0)
    assert engine.speculation_stats()["acceptance_rate"] == 1.0 and all(len(o) == 9 for o in out)
