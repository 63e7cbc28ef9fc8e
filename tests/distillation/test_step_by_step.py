"""Distilling step-by-step: the program teacher's rationales checked by brute force, the multi-task examples and
their weights, and the label-task scorer against an oracle."""

import re

import pytest
import torch

from effref.distillation.step_by_step import (
    CHARS,
    AdditionTask,
    build_examples,
    check_rationale,
    decode,
    encode,
    label_accuracy,
    rationale,
    train_step_by_step,
)
from effref.distillation.trainer import DistillConfig


def brute_force_ok(a: int, b: int, text: str, digits: int) -> bool:
    """Re-derive every column from the decimal strings of a and b, independently of the module."""
    sa, sb = str(a).zfill(digits)[::-1], str(b).zfill(digits)[::-1]
    carry, written = 0, ""
    columns = text.split(",")
    if len(columns) != digits:
        return False
    for col, step in enumerate(columns):
        lhs, rhs = step.split("=")
        terms = [int(t) for t in lhs.split("+")]
        if terms[:2] != [int(sa[col]), int(sb[col])] or sum(terms[2:]) != carry or len(terms) > 3:
            return False
        if int(rhs) != sum(terms):
            return False
        written += str(int(rhs) % 10)
        carry = int(rhs) // 10
    return int((written + (str(carry) if carry else ""))[::-1]) == a + b


def test_every_two_digit_rationale_is_correct_by_brute_force():
    for a in range(10, 100):
        for b in range(10, 100):
            text = rationale(a, b, 2)
            assert brute_force_ok(a, b, text, 2), (a, b, text)
            assert check_rationale(a, b, text, 2)


def test_three_digit_rationales_and_an_example():
    assert rationale(37, 48, 2) == "7+8=15,3+4+1=8"
    g = torch.Generator().manual_seed(0)
    for a, b in torch.randint(100, 1000, (300, 2), generator=g).tolist():
        assert brute_force_ok(a, b, rationale(a, b, 3), 3)


@pytest.mark.parametrize("text", ["7+8=15,3+4=7", "7+8=15,3+4+1=9", "7+9=16,3+4+1=8", "7+8=15", "7+8=15,3+4+2=9"])
def test_check_rationale_rejects_wrong_steps(text):
    assert not check_rationale(37, 48, text, 2)
    assert not brute_force_ok(37, 48, text, 2)


def test_problems_are_disjoint_and_sized():
    task = AdditionTask(digits=2, n_train=200, n_test=100, seed=3)
    train, test = task.problems()
    assert len(train) == 200 and len(test) == 100 and not set(train) & set(test)
    assert all(10 <= a < 100 and 10 <= b < 100 for a, b in train + test)
    with pytest.raises(ValueError, match="exceeds the 8100 distinct 2-digit problems"):
        AdditionTask(n_train=8000, n_test=200).problems()


@pytest.mark.parametrize("reverse", [True, False])
def test_examples_hold_both_tasks_with_per_example_mean_weights(reverse):
    task = AdditionTask(reverse_answer=reverse)
    ids, w = build_examples([(37, 48), (91, 19)], task, with_rationale=True, rationale_weight=0.5)
    rows = [decode(r).rstrip("_") for r in ids]
    answer = "58" if reverse else "85"
    assert rows[0] == f"L37+48:{answer}." and rows[1] == "R37+48:7+8=15,3+4+1=8."
    assert rows[2] == ("L91+19:011." if reverse else "L91+19:110.")
    torch.testing.assert_close(w.sum(1), torch.tensor([1.0, 0.5, 1.0, 0.5]))
    for row, weights in zip(ids, w):  # weighted positions predict exactly the characters after ":"
        text = decode(row)
        targets = "".join(text[j + 1] for j in range(len(weights)) if weights[j] > 0)
        assert targets == re.split(":", text.rstrip("_"), maxsplit=1)[1]
    ids1, w1 = build_examples([(37, 48)], task, with_rationale=False)
    assert ids1.shape[0] == 1 and w1.sum() == 1


class Oracle(torch.nn.Module):
    """Answers every label prompt correctly, by reading the prompt: an independent check of the scorer."""

    def __init__(self, task):
        super().__init__()
        self.task = task

    def generate(self, prompts, n, temperature=0.0):
        outs = []
        for row in prompts:
            a, b = map(int, decode(row)[1:-1].split("+"))
            outs.append(encode(decode(row) + (self.task.answer(a, b) + "....")[:n]))
        return torch.tensor(outs)


def test_label_accuracy_scores_an_oracle_perfectly_and_a_liar_at_zero():
    task = AdditionTask()
    _, test = task.problems()
    assert label_accuracy(Oracle(task), test[:50], task) == 1.0
    assert label_accuracy(Oracle(AdditionTask(reverse_answer=not task.reverse_answer)), test[:50], task) < 0.2


def test_training_runs_and_learns_the_training_labels_a_little():
    task = AdditionTask(n_train=64, n_test=32)
    cfg = DistillConfig(objective="supervised", steps=30, lr=1e-2, batch_size=16)
    result, acc = train_step_by_step(task, True, cfg, progress=False)
    assert result.losses[-1] < 0.6 * result.losses[0] and 0.0 <= acc <= 1.0
    with pytest.raises(ValueError, match="step-by-step trains with 'supervised'"):
        train_step_by_step(task, True, DistillConfig(objective="forward_kl"), progress=False)


def test_unknown_characters_are_refused():
    with pytest.raises(ValueError, match=r"characters \['x'\] are not in the task alphabet"):
        encode("12x3")
    assert decode(encode(CHARS)) == CHARS
