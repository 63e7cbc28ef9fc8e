"""The distillation loop: on-policy steps score the student's own samples, seq-KD learns the teacher's text,
cached top-k targets equal the live teacher at k = V, KD lowers the divergence, and bad arguments are refused."""

import pytest
import torch
from torch import nn

import effref
from effref.distillation import (
    DistillConfig,
    TeacherTargets,
    cache_teacher_targets,
    distill,
    forward_kl,
    generalized_jsd,
    teacher_generations,
)
from effref.models.llama import Llama, LlamaConfig

V = 16


def tiny_llama(seed: int = 0, vocab: int = V, tie: bool = True) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(vocab_size=vocab, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64,
                             max_seq_len=64, tie_embeddings=tie)).eval()


def always(token: int, seed: int = 0) -> Llama:
    """A model whose every prediction puts (almost) all mass on ``token``, whatever the input."""
    model = tiny_llama(seed, tie=False)
    with torch.no_grad():
        model.embed.weight.copy_(torch.randn(1, 32).expand(V, 32))  # every input token looks the same
        for block in model.blocks:
            block.attn.o_proj.weight.zero_()
            block.mlp.down.weight.zero_()  # blocks add nothing: the final state is the constant embedding
        u = model.norm(model.embed.weight[:1])[0]
        model.lm_head.weight.zero_()
        model.lm_head.weight[token] = 50 * u / u.pow(2).sum()  # logit 50 for `token`, 0 elsewhere
    return model


class Recorder(nn.Module):
    """Wraps a teacher and keeps every input it scores."""

    def __init__(self, model: Llama):
        super().__init__()
        self.model, self.cfg, self.seen = model, model.cfg, []

    def forward(self, ids):
        self.seen.append(ids.clone())
        return self.model(ids)


def corpus(n=12, L=10, seed=0):
    return torch.randint(0, V, (n, L), generator=torch.Generator().manual_seed(seed))


def test_on_policy_steps_train_on_the_student_samples_that_the_teacher_scores():
    student, teacher = always(7), Recorder(tiny_llama(1))
    cfg = DistillConfig(objective="gkd", steps=3, lr=1e-6, batch_size=2, prompt_len=4, on_policy=1.0)
    result = distill(student, teacher, corpus(), cfg, progress=False)
    assert len(result.samples) == 3 and result.teacher_calls == 3
    for sample, seen in zip(result.samples, teacher.seen):
        assert sample.shape == (2, 6) and bool((sample == 7).all())  # the student's only token
        assert torch.equal(seen[:, 4:], sample[:, :-1])  # the teacher scored exactly those tokens


def test_injected_sampler_is_used_and_lambda_zero_never_samples():
    data = corpus()
    calls = []

    def sampler(student, prompt, n):
        calls.append(prompt.clone())
        return torch.cat([prompt, torch.full((len(prompt), n), 3)], dim=1)

    teacher = Recorder(tiny_llama(1))
    cfg = DistillConfig(objective="gkd", steps=4, batch_size=2, prompt_len=5, on_policy=1.0)
    result = distill(tiny_llama(2), teacher, data, cfg, sampler=sampler, progress=False)
    assert len(calls) == 4 and all(bool((s == 3).all()) for s in result.samples)
    assert all(bool((seen[:, 5:] == 3).all()) for seen in teacher.seen)
    assert all(any(torch.equal(row, d[:5]) for d in data) for p in calls for row in p)  # prompts are data
    teacher.seen.clear()
    off = distill(tiny_llama(2), teacher, data, DistillConfig(objective="gkd", steps=4, on_policy=0.0),
                  sampler=sampler, progress=False)
    assert off.samples == [] and len(calls) == 4
    assert all(any(torch.equal(row, d[:-1]) for d in data) for seen in teacher.seen for row in seen)


def test_gkd_loss_is_the_generalized_jsd_on_the_sampled_positions_only():
    data, P = corpus(), 4
    data[:, :P] = data[0, :P]  # every row has the same prompt x, so any draw gives the same step
    fixed = torch.randint(0, V, (2, 10 - P), generator=torch.Generator().manual_seed(9))

    def sampler(student, prompt, n):
        return torch.cat([prompt, fixed], dim=1)

    student, teacher = tiny_llama(2), tiny_llama(1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = DistillConfig(objective="gkd", steps=1, batch_size=2, prompt_len=P, beta=0.3, temperature=1.5)
    loss = distill(student, teacher, data, cfg, sampler=sampler, progress=False).losses[0]
    student.load_state_dict(before)
    ids = torch.cat([data[:2, :P], fixed], dim=1)  # the prompt, then the sample
    with torch.no_grad():
        zs, zt = student(ids[:, :-1]), teacher(ids[:, :-1])
    mask = torch.zeros(2, 9)
    mask[:, P - 1:] = 1  # position j predicts token j + 1: only the sampled tokens are scored
    assert loss == pytest.approx(generalized_jsd(zs, zt, mask, temperature=1.5, beta=0.3).item(), rel=1e-5)


def test_teacher_generations_are_greedy_teacher_text_and_seq_kd_learns_it():
    teacher = always(5)
    prompts = corpus(n=8, L=4, seed=3)
    text = teacher_generations(teacher, prompts, 6, batch_size=3, progress=False)
    ids = prompts.clone()  # independent greedy loop without a cache
    for _ in range(6):
        ids = torch.cat([ids, teacher(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(text, ids) and bool((text[:, 4:] == 5).all())
    student = tiny_llama(4)
    before = student(prompts)[:, -1].softmax(-1)[:, 5].mean().item()
    result = distill(student, None, text, DistillConfig(objective="seq_kd", steps=25, lr=1e-2, prompt_len=4),
                     progress=False)
    after = student(prompts)[:, -1].softmax(-1)[:, 5].mean().item()
    assert before < 0.2 and after > 0.9, (before, after)
    assert result.losses[-1] < result.losses[0]


def test_cached_targets_at_full_k_equal_the_live_teacher():
    teacher, data = tiny_llama(1), corpus()
    cached = cache_teacher_targets(teacher, data, k=V, batch_size=5, progress=False)
    rows = torch.tensor([0, 3, 11])
    torch.testing.assert_close(cached.dense(rows), teacher(data[rows, :-1]).log_softmax(-1))
    cfg = DistillConfig(objective="reverse_kl", steps=3, seed=1)
    live = distill(tiny_llama(2), teacher, data, cfg, progress=False).losses
    cold = distill(tiny_llama(2), cached, data, cfg, progress=False).losses
    assert live == pytest.approx(cold, rel=1e-4)


def test_cache_answers_off_policy_steps_and_the_live_teacher_only_fresh_samples():
    teacher, data = Recorder(tiny_llama(1)), corpus()
    cached = cache_teacher_targets(teacher.model, data, k=V, progress=False)
    cfg = DistillConfig(objective="gkd", steps=12, prompt_len=4, on_policy=0.5, seed=3)
    mixed = distill(tiny_llama(2), teacher, data, cfg, cached=cached, progress=False)
    assert 0 < len(mixed.samples) < 12 and mixed.teacher_calls == len(mixed.samples) == len(teacher.seen)
    live = distill(tiny_llama(2), tiny_llama(1), data, cfg, progress=False)  # same draws, all live
    assert live.teacher_calls == 12 and live.losses == pytest.approx(mixed.losses, rel=1e-4)


def test_top_k_targets_keep_the_top_k_and_spread_the_rest_evenly():
    teacher, data = tiny_llama(1), corpus()
    cached = cache_teacher_targets(teacher, data, k=4, progress=False)
    dense = cached.dense(torch.arange(len(data)))  # (N, L-1, V)
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(dense.shape[:2]))
    full = teacher(data[:, :-1]).log_softmax(-1)
    top = full.topk(4, dim=-1)
    torch.testing.assert_close(dense.gather(-1, top.indices), top.values)
    rest = dense.exp().scatter(-1, top.indices, 0.0)  # (N, L-1, V): the tail, top-k zeroed
    expected = (1 - top.values.exp().sum(-1, keepdim=True)) / (V - 4)
    torch.testing.assert_close(rest.max(-1, keepdim=True).values, expected)


@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl", "gkd"])
def test_distillation_brings_the_student_closer_to_the_teacher(objective):
    effref.seed_everything(0)
    teacher, student, data = tiny_llama(1), tiny_llama(2), corpus(n=16)
    with torch.no_grad():
        start = forward_kl(student(data[:, :-1]), teacher(data[:, :-1])).item()
    distill(student, teacher, data, DistillConfig(objective=objective, steps=40, lr=1e-2, prompt_len=3),
            progress=False)
    with torch.no_grad():
        end = forward_kl(student(data[:, :-1]), teacher(data[:, :-1])).item()
    assert end < 0.7 * start, (start, end)


def test_evaluate_is_called_before_after_and_every_n_steps():
    seen = []
    result = distill(tiny_llama(2), None, corpus(), DistillConfig(objective="supervised", steps=5, eval_every=2),
                     evaluate=lambda m: seen.append(1) or float(len(seen)), progress=False)
    assert [s for s, _ in result.evals] == [0, 2, 4, 5]


def bad(**changes):
    base = {"student": tiny_llama(2), "teacher": tiny_llama(1), "data": corpus(), "config": DistillConfig()}
    base.update(changes)
    return lambda: distill(base["student"], base["teacher"], base["data"], base["config"],
                           weights=base.get("weights"), progress=False)


BAD = [
    (bad(config=DistillConfig(objective="dpo")), "objective='dpo' is not known"),
    (bad(teacher=None), "objective='forward_kl' needs a teacher"),
    (bad(config=DistillConfig(objective="supervised")), "reads no teacher; pass teacher=None"),
    (bad(teacher=tiny_llama(1, vocab=32)), "student vocabulary size 16 != teacher vocabulary size 32"),
    (bad(config=DistillConfig(objective="gkd"), teacher=TeacherTargets(torch.zeros(12, 9, 2),
                                                                      torch.zeros(12, 9, 2, dtype=torch.long), V)),
     "on-policy GKD needs the live teacher"),
    (bad(teacher=TeacherTargets(torch.zeros(3, 9, 2), torch.zeros(3, 9, 2, dtype=torch.long), V)),
     "TeacherTargets cover (3, 9) positions"),
    (bad(config=DistillConfig(objective="gkd", on_policy=1.5)), "on_policy=1.5 must lie in [0, 1]"),
    (lambda: distill(tiny_llama(2), None, corpus(), DistillConfig(objective="seq_kd"), progress=False,
                     cached=TeacherTargets(torch.zeros(12, 9, 2), torch.zeros(12, 9, 2, dtype=torch.long), V)),
     "cached= serves the off-policy steps of a live teacher"),
    (bad(config=DistillConfig(objective="gkd", prompt_len=10)), "prompt_len=10 must lie in [1, L - 1]"),
    (bad(weights=torch.ones(12, 10)), "weights shape (12, 10) != (N, L - 1)"),
    (bad(data=corpus().float()), "data must be integer token ids"),
    (bad(config=DistillConfig(steps=0)), "steps=0"),
    (bad(config=DistillConfig(temperature=0.0)), "temperature=0.0 must be a finite number > 0"),
    (bad(config=DistillConfig(objective="gkd", beta=2.0, on_policy=0.0)), "beta=2.0 must lie in [0, 1]"),
]


@pytest.mark.parametrize("call, message", BAD)
def test_bad_arguments_are_refused_with_a_clear_message(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)


@pytest.mark.slow
def test_smollm2_teacher_vocabulary_and_cached_targets():
    if not effref.assets.is_available("smollm2-135m"):
        pytest.skip("SmolLM2-135M is not fetched (python -m effref.assets fetch smollm2-135m)")
    teacher = effref.models.load_model("smollm2-135m", impl="effref").model
    with pytest.raises(ValueError, match="vocab_size=49152"):
        distill(tiny_llama(0), teacher, corpus(), progress=False)
    data = torch.randint(0, 49152, (1, 9), generator=torch.Generator().manual_seed(0))
    cached = cache_teacher_targets(teacher, data, k=8, progress=False)
    with torch.no_grad():
        top = teacher(data[:, :-1]).log_softmax(-1).topk(8, dim=-1)
    torch.testing.assert_close(cached.log_probs, top.values)
    assert torch.equal(cached.indices, top.indices)
