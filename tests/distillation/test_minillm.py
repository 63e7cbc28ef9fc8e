"""MiniLLM's policy gradient: exact in expectation (a toy autoregressive model small enough to enumerate every
sequence), its length normalisation and importance weights, teacher-mixed sampling, and the trainer objective."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from effref.distillation import DistillConfig, distill
from effref.distillation.minillm import minillm_surrogate, mixed_sample
from effref.models.llama import Llama, LlamaConfig

V = 3


def toy_logits(first: torch.Tensor, table: torch.Tensor, sequence: tuple[int, int]) -> torch.Tensor:
    """A two-token autoregressive model: logits `first` for y1, then row y1 of `table` for y2; (1, 2, V)."""
    return torch.stack([first, table[sequence[0]]])[None]


def test_expected_gradient_equals_the_gradient_of_the_sequence_reverse_kl():
    torch.manual_seed(0)
    first, table = torch.randn(V, requires_grad=True), torch.randn(V, V, requires_grad=True)
    teacher_first, teacher_table = torch.randn(V), torch.randn(V, V)
    sequences = list(itertools.product(range(V), repeat=2))

    def log_prob(a, b, seq):  # log of the model's probability of the whole sequence
        return F.log_softmax(a, -1)[seq[0]] + F.log_softmax(b[seq[0]], -1)[seq[1]]

    # the exact objective, every sequence enumerated: KL(q ‖ p) = Σ_y q(y) (log q(y) − log p(y))
    exact = sum(log_prob(first, table, s).exp() * (log_prob(first, table, s) - log_prob(teacher_first, teacher_table, s))
                for s in sequences)
    exact_grad = torch.autograd.grad(exact, (first, table))

    # the estimator's expectation: Σ_y q(y) ∇ surrogate(y), q(y) held fixed, as sampling would weight it
    expected = sum(log_prob(first, table, s).exp().detach() * minillm_surrogate(
        toy_logits(first, table, s), toy_logits(teacher_first, teacher_table, s), torch.tensor([s]),
        torch.ones(1, 2), normalize_length=False) * 2  # the surrogate averages over the 2 response tokens
        for s in sequences)
    estimate_grad = torch.autograd.grad(expected, (first, table))
    for mine, ref in zip(estimate_grad, exact_grad):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)
    assert exact_grad[1].abs().max() > 1e-2  # a real gradient, through the second step too


def test_length_normalisation_and_importance_weights_match_a_direct_computation():
    torch.manual_seed(1)
    B, T = 2, 5
    student, teacher = torch.randn(B, T, 7), torch.randn(B, T, 7)
    tokens = torch.randint(0, 7, (B, T))
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0]]).float()  # a prompt position, and a padded end
    behaviour = torch.randn(B, T).clamp(max=-0.1)
    got = minillm_surrogate(student, teacher, tokens, mask, behaviour_log_probs=behaviour)

    log_q, log_p = student.log_softmax(-1), teacher.log_softmax(-1)
    total = 0.0
    for b in range(B):
        response = [t for t in range(T) if mask[b, t]]
        rewards = {t: (log_p[b, t, tokens[b, t]] - log_q[b, t, tokens[b, t]]).item() for t in response}
        for t in response:
            later = [rewards[s] for s in response if s > t]
            future = sum(later) / len(later) if later else 0.0
            kl = (log_q[b, t].exp() * (log_q[b, t] - log_p[b, t])).sum().item()
            weight = (log_q[b, t, tokens[b, t]] - behaviour[b, t]).exp().item()
            total += weight * (kl - future * log_q[b, t, tokens[b, t]].item())
    assert got.item() == pytest.approx(total / mask.sum().item(), rel=1e-5)


def test_a_student_equal_to_its_teacher_has_zero_loss_and_gradient():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    loss = minillm_surrogate(logits, logits.detach().clone(), torch.randint(0, 5, (2, 4)), torch.ones(2, 4))
    loss.backward()
    assert abs(loss.item()) < 1e-6 and logits.grad.abs().max() < 1e-6


def tiny(seed):
    torch.manual_seed(seed)
    return Llama(LlamaConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64,
                             max_seq_len=32)).eval()


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_mixed_sampling_reports_the_probability_of_the_distribution_it_sampled(alpha):
    student, teacher = tiny(0), tiny(1)
    prompt = torch.randint(0, 16, (3, 4))
    ids, log_mixed = mixed_sample(student, teacher, prompt, 5, alpha=alpha,
                                  generator=torch.Generator().manual_seed(0))
    assert ids.shape == (3, 9) and torch.equal(ids[:, :4], prompt)
    source = teacher if alpha == 1.0 else student
    with torch.no_grad():
        expected = source(ids[:, :-1]).log_softmax(-1)[:, 3:].gather(-1, ids[:, 4:, None])[..., 0]  # (3, 5)
    torch.testing.assert_close(log_mixed, expected, rtol=1e-4, atol=1e-4)


def test_the_trainer_lowers_the_reverse_kl_to_the_teacher():
    student, teacher = tiny(0), tiny(1)
    data = torch.randint(0, 16, (16, 12), generator=torch.Generator().manual_seed(0))

    def reverse_kl(model):
        with torch.no_grad():
            log_q, log_p = model(data[:, :-1]).log_softmax(-1), teacher(data[:, :-1]).log_softmax(-1)
            return (log_q.exp() * (log_q - log_p)).sum(-1).mean().item()

    before = reverse_kl(student)
    result = distill(student, teacher, data, DistillConfig(objective="minillm", steps=25, lr=1e-2, prompt_len=4),
                     progress=False)
    assert reverse_kl(student) < 0.5 * before
    assert len(result.samples) == 25  # every step trained on freshly sampled responses


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        mixed_sample(tiny(0), tiny(1), torch.zeros(1, 2, dtype=torch.long), 3, alpha=1.5)
    with pytest.raises(ValueError, match="mask"):
        minillm_surrogate(torch.randn(1, 3, 4), torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.long),
                          torch.ones(1, 2))
    with pytest.raises(ValueError, match="mix_alpha"):
        distill(tiny(0), tiny(1), torch.zeros(4, 8, dtype=torch.long),
                DistillConfig(objective="minillm", mix_alpha=-0.1), progress=False)
