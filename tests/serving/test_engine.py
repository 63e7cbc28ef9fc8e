"""Engine and scheduler: every request's output equals running it alone, with preemption, sharing and forks."""

import itertools
import math

import pytest
import torch

from effref.models import load_model
from effref.serving import BlockManager, Engine, Scheduler, Sequence, TraceConfig, make_trace

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llama", impl="effref", seed=0).model


@pytest.fixture(scope="module")
def requests():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 17, 33, 1, 40, 16, 9]
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
    return prompts, [7, 20, 3, 12, 9, 30, 1]


def record_steps(engine):
    """Wrap the engine's scheduler so every scheduled ``Step`` is kept in the returned list."""
    steps, schedule = [], engine.scheduler.schedule

    def watch():
        steps.append(schedule())
        return steps[-1]
    engine.scheduler.schedule = watch
    return steps


def alone(model, prompt, n):
    """The reference: our Llama's own generate (dense KVCache), one request at a time."""
    return model.generate(torch.tensor([prompt]), n)[0, len(prompt):].tolist()


@pytest.mark.parametrize("block_size,max_batch", [(16, 8), (4, 3), (1, 2)])
def test_continuous_batching_output_equals_running_each_request_alone(model, requests, block_size, max_batch):
    prompts, lengths = requests
    engine = Engine(model, num_blocks=2048 // block_size, block_size=block_size, max_batch=max_batch)
    out = engine.generate(prompts, lengths)
    assert out == [alone(model, p, n) for p, n in zip(prompts, lengths)]
    assert engine.manager.num_free == engine.manager.allocator.num_blocks  # everything returned
    assert engine.steps < sum(lengths)  # requests really shared iterations


def test_preemption_by_recomputation_keeps_outputs_identical(model, requests):
    prompts, lengths = requests
    engine = Engine(model, num_blocks=14, block_size=4, max_batch=7)  # 56 slots for ~200 tokens in flight
    steps = record_steps(engine)
    out = engine.generate(prompts, lengths)
    assert any(s.preempted for s in steps), "the tiny pool should have forced at least one preemption"
    assert out == [alone(model, p, n) for p, n in zip(prompts, lengths)]
    assert engine.manager.num_free == 14


def test_preemption_by_swapping_to_cpu_keeps_outputs_identical(model, requests):
    prompts, lengths = requests
    engine = Engine(model, num_blocks=14, block_size=4, max_batch=7, preemption="swap", num_cpu_blocks=32)
    steps = record_steps(engine)
    out = engine.generate(prompts, lengths)
    swapped_out = [pair for s in steps for pair in s.swap_out]
    swapped_in = [pair for s in steps for pair in s.swap_in]
    assert swapped_out and sorted(c for _, c in swapped_out) == sorted(c for c, _ in swapped_in)
    assert out == [alone(model, p, n) for p, n in zip(prompts, lengths)]
    assert engine.manager.num_free == 14 and engine.scheduler.cpu.num_free == 32


def test_shared_prompt_prefixes_are_computed_once_and_give_the_same_output(model, requests):
    prefix = requests[0][4][:32]
    prompts = [prefix + [1, 2, 3], prefix + [4], prefix + [5, 6]]
    engine = Engine(model, num_blocks=64, block_size=8, max_batch=4)
    steps = record_steps(engine)
    out = engine.generate(prompts, 5)
    assert out == [alone(model, p, 5) for p in prompts]
    first = steps[0]  # all three prefills; the token counts are read before commit appends outputs
    assert first.starts == [0, 32, 32]  # prompts 2 and 3 skip the 32 shared tokens (4 full blocks)


def test_sampling_does_not_depend_on_the_batch(model, requests):
    prompts, lengths = requests
    batched = Engine(model, num_blocks=128, block_size=4, max_batch=3).generate(
        prompts, lengths, temperature=0.8, top_k=50, seed=11)
    single = [Engine(model, num_blocks=128, block_size=4).generate([p], [n], temperature=0.8, top_k=50,
                                                                 seed=11 + i)[0]
              for i, (p, n) in enumerate(zip(prompts, lengths))]
    assert batched == single
    assert batched[1] != alone(model, prompts[1], lengths[1])  # it did sample


def test_parallel_samples_share_the_prompt_and_copy_on_write(model, requests):
    prompt = requests[0][1]  # 17 tokens: the last block (size 4) holds one token, shared by the forks
    engine = Engine(model, num_blocks=64, block_size=4)
    steps = record_steps(engine)
    greedy = engine.generate([prompt], 6, n_samples=3)
    copies = [c for s in steps for c in s.copies]
    assert greedy == [alone(model, prompt, 6)] * 3 and len(copies) == 2  # two children copy, the parent keeps
    sampled = engine.generate([prompt], 6, n_samples=3, temperature=1.0, seed=0)
    assert len({tuple(s) for s in sampled}) == 3
    assert engine.manager.num_free == 64


def test_stream_yields_tokens_as_they_are_produced(model, requests):
    prompts, lengths = requests
    engine = Engine(model, num_blocks=256, block_size=4, max_batch=8)
    events, steps_seen = [], []
    for rid, token in engine.stream(prompts, lengths):
        events.append((rid, token))
        steps_seen.append(engine.steps)
    assert steps_seen[0] == 1 and len(events) == sum(lengths)  # the first tokens arrive after one step
    assert [t for r, t in events if r == 1] == alone(model, prompts[1], lengths[1])


def test_serve_replays_a_trace_with_consistent_timings(model):
    trace = make_trace(TraceConfig(n_requests=6, rate=50.0, prompt_len=(4, 20), output_len=(1, 12),
                                   output_mean=4.0, seed=1))
    g = torch.Generator().manual_seed(1)
    reqs = [(r.arrival, torch.randint(0, 256, (r.prompt_len,), generator=g).tolist(), r.output_len)
            for r in trace]
    done = Engine(model, num_blocks=64, block_size=4, max_batch=4).serve(reqs)
    for seq, (arrival, prompt, n) in zip(done, reqs):
        assert seq.arrival <= seq.first_token_time <= seq.finish_time and len(seq.output) == n
        assert seq.output == alone(model, prompt, n)


def test_scheduler_is_fcfs_bounded_and_preempts_the_newest_first():
    """Model-free: every step appends one token per running sequence; check the queue discipline by hand."""
    scheduler = Scheduler(BlockManager(6, block_size=2), max_batch=2, max_step_tokens=100)
    for i, (p, n) in enumerate([(3, 2), (3, 4), (1, 1)]):
        scheduler.add(Sequence(i, [i] * p, n))  # distinct prompts: no prefix sharing
    step = scheduler.schedule()
    assert [s.request_id for s in step.seqs] == [0, 1] and step.starts == [0, 0]  # max_batch=2, in order
    scheduler.commit(step, [1, 1])
    step = scheduler.schedule()  # 0 finishes at this step; 2 must wait for a free batch slot
    assert [s.request_id for s in step.seqs] == [0, 1] and step.starts == [3, 3]
    assert [s.request_id for s in scheduler.commit(step, [1, 1])] == [0]
    step = scheduler.schedule()  # a slot opened: request 2 joins at once (iteration-level scheduling)
    assert [s.request_id for s in step.seqs] == [1, 2]
    tight = Scheduler(BlockManager(4, block_size=2), max_batch=4)
    for i in range(2):
        tight.add(Sequence(i, [i] * 4, 3))  # 2 blocks each: the pool is full after admission
    tight.commit(tight.schedule(), [5, 5])
    step = tight.schedule()  # both need a third block: the newest (1) gives way, the oldest continues
    assert [s.request_id for s in step.preempted] == [1] and [s.request_id for s in step.seqs] == [0]
    assert tight.waiting[0].request_id == 1 and tight.waiting[0].num_computed == 0


def test_trace_is_seeded_and_has_the_requested_statistics():
    cfg = TraceConfig(n_requests=4000, rate=5.0, prompt_len=(10, 20), output_len=(1, 10**6),
                      output_mean=30.0, seed=3)
    a, b = make_trace(cfg), make_trace(cfg)
    assert a == b and a != make_trace(TraceConfig(**{**cfg.__dict__, "seed": 4}))
    gaps = [y.arrival - x.arrival for x, y in itertools.pairwise(a)]
    # means of 4000 draws: standard errors are 1.6% (gaps) and 1.6% (outputs); 10% bounds are > 6 sigma
    assert math.isclose(sum(gaps) / len(gaps), 1 / 5.0, rel_tol=0.1)
    assert math.isclose(sum(r.output_len for r in a) / len(a), 30.0, rel_tol=0.1)
    assert all(10 <= r.prompt_len <= 20 for r in a)
    assert all(r.arrival == 0 for r in make_trace(TraceConfig(n_requests=5)))


@pytest.mark.parametrize("call,error,message", [
    (lambda m: Engine(m, num_blocks=4, block_size=4).generate([[1] * 10], 8), ValueError,
     "needs up to 18 tokens of KV cache"),
    (lambda m: Engine(m, num_blocks=100, block_size=16).generate([[1] * 500], 20), ValueError,
     "max_seq_len"),
    (lambda m: Engine(m).generate([[]], 4), ValueError, "non-empty prompt"),
    (lambda m: Engine(m).generate([[1]], 0), ValueError, "max_new_tokens >= 1"),
    (lambda m: Engine(m).generate([[1], [2]], [3]), ValueError, "1 entries for 2 prompts"),
    (lambda m: Engine(m).generate([[1]], 3, temperature=-1.0), ValueError, "temperature=-1.0"),
    (lambda m: Engine(m).generate([[1]], 3, n_samples=0), ValueError, "n_samples=0"),
    (lambda m: Engine(torch.nn.Linear(2, 2)), TypeError, "Llama.from_hf"),
    (lambda m: Engine(m, block_size=0), ValueError, "block_size=0"),
    (lambda m: Engine(m, max_batch=0), ValueError, "max_batch=0"),
    (lambda m: Engine(m, preemption="swap"), ValueError, "num_cpu_blocks >= 1"),
    (lambda m: Engine(m, preemption="drop"), ValueError, "preemption='drop'"),
    (lambda m: TraceConfig(rate=0.0), ValueError, "rate=0.0"),
    (lambda m: TraceConfig(prompt_len=(5, 2)), ValueError, "prompt_len"),
    (lambda m: TraceConfig(output_len=(1, 8), output_mean=20.0), ValueError, "output_mean=20.0"),
])
def test_bad_inputs_are_reported(model, call, error, message):
    with pytest.raises(error, match=message):
        call(model)


def test_a_rejected_request_leaves_the_engine_usable(model):
    engine = Engine(model, num_blocks=4, block_size=4)
    with pytest.raises(ValueError):
        engine.generate([[1, 2], [1] * 30], 4)
    assert engine.generate([[1, 2]], 3) == [alone(model, [1, 2], 3)]
