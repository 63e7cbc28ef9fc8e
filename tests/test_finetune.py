"""The fine-tuning bench on a tiny random LLaMA with a byte tokenizer and six synthetic 'novels'."""

import copy
import random

import pytest
import torch

from effref.finetune import (
    accuracy_se,
    byte_tokenizer,
    class_scores,
    evaluate,
    last_logits,
    novel_task,
    split_top_layers,
    task_loss,
    toy_task,
    train,
)
from effref.models import load_model


def small_task(**kw):
    args = {"passage_tokens": 24, "train_per_class": 16, "test_per_class": 8, "texts": toy_texts(),
                "verbalisers": {f"n{i}": chr(ord("A") + i) for i in range(6)}, "suffix": "\n:"}
    return novel_task(byte_tokenizer, **(args | kw))


def toy_texts():
    rng = random.Random(0)
    return {f"n{i}": " ".join("".join(rng.choice(a) for _ in range(rng.randint(2, 6))) for _ in range(3000))
            for i, a in enumerate(["abc", "def", "ghi", "jkl", "mno", "pqr"])}


def test_toy_task_is_the_same_construction():
    assert torch.equal(toy_task().train_ids, small_task().train_ids)


def test_task_is_deterministic_balanced_and_train_test_disjoint():
    a, b = small_task(), small_task()
    assert torch.equal(a.train_ids, b.train_ids) and torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(a.train_ids, small_task(seed=1).train_ids)
    assert a.train_ids.shape == (96, 24 + 2) and a.test_ids.shape == (48, 26)
    assert torch.bincount(a.train_labels).tolist() == [16] * 6
    assert {tuple(r) for r in a.train_ids.tolist()}.isdisjoint({tuple(r) for r in a.test_ids.tolist()})
    assert a.label_ids.tolist() == [ord(c) for c in "ABCDEF"]


def test_evaluate_equals_brute_force_argmax_over_verbalisers():
    model = load_model("tiny-llama", seed=0).model
    task = small_task()
    logits = model(task.test_ids).logits[:, -1][:, task.label_ids]  # full forward, then pick the six tokens
    expected = (logits.argmax(-1) == task.test_labels).float().mean().item()
    assert evaluate(model, task, batch_size=5) == pytest.approx(expected)


def test_training_learns_the_task_and_reports_its_costs():
    torch.manual_seed(0)
    model = load_model("tiny-llama", seed=0).model
    task = small_task()
    before = evaluate(model, task)
    result = train(model, task, steps=40, lr=3e-3, batch_size=16, progress=False)
    after = evaluate(model, task)
    assert after >= 0.8 > before + 0.3, (before, after)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert result.trainable_params == sum(p.numel() for p in model.parameters())
    assert result.peak_memory.peak_bytes > 3 * 4 * result.trainable_params  # weights + grads + Adam's 2 states
    assert result.tokens_per_s > 0 and len(result.losses) == 40


def test_train_uses_only_parameters_that_require_grad():
    model = load_model("tiny-llama", seed=0).model
    frozen = copy.deepcopy(model.model.layers[0].state_dict())
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    train(model, small_task(), steps=2, lr=1e-2, batch_size=4, progress=False)
    for k, v in model.model.layers[0].state_dict().items():
        assert torch.equal(v, frozen[k]), k


@pytest.mark.parametrize("kwargs, match", [
    ({"verbalisers": {f"n{i}": "Z" + str(i) for i in range(6)}}, "share a first token"),
    ({"verbalisers": {"n0": "A"}}, "same classes"),
    ({"passage_tokens": 2}, "passage_tokens=2"),
    ({"passage_tokens": 100000}, "too short"),
])
def test_novel_task_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_task(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps=0"),
    ({"optimizer": "lion"}, "optimizer='lion'"),
])
def test_train_rejects_bad_input(kwargs, match):
    model = load_model("tiny-llama", seed=0).model
    with pytest.raises(ValueError, match=match):
        train(model, small_task(), **({"steps": 1, "lr": 1e-3} | kwargs), progress=False)


def test_train_refuses_a_fully_frozen_model():
    model = load_model("tiny-llama", seed=0).model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        train(model, small_task(), steps=1, lr=1e-3, progress=False)


def test_split_top_layers_gives_the_full_models_logits_and_shares_weights():
    model = load_model("tiny-llama", seed=0).model
    task = toy_task()
    top, cached = split_top_layers(model, task, n_top=1, progress=False)
    assert cached.train_ids.shape == (*task.train_ids.shape, 64)
    torch.testing.assert_close(last_logits(top, cached.test_ids), last_logits(model, task.test_ids))
    assert evaluate(top, cached) == evaluate(model, task)
    torch.testing.assert_close(top(inputs_embeds=cached.test_ids[:2]).logits[:, -1],
                               model(task.test_ids[:2]).logits[:, -1])  # a plain call works too
    assert top.lm_head is model.lm_head and top.model.layers[0] is not model.model.layers[1]
    assert top.model.layers[0].self_attn.layer_idx == 0 and model.model.layers[1].self_attn.layer_idx == 1
    out = top(inputs_embeds=cached.test_ids[:1], use_cache=True)  # a cache of the top model's own size works
    assert out.past_key_values.get_seq_length() == cached.test_ids.shape[1]
    with pytest.raises(ValueError, match="n_top=3"):
        split_top_layers(model, task, n_top=3, progress=False)
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        split_top_layers(load_model("tiny-llama", impl="effref").model, task, 1, progress=False)


def test_vocabulary_loss_differs_from_class_loss():
    model = load_model("tiny-llama", seed=0).model
    task = toy_task()
    x, y = task.train_ids[:4], task.train_labels[:4]
    logits = model(x).logits[:, -1]
    full = torch.nn.functional.cross_entropy(logits, task.label_ids[y])
    classes = torch.nn.functional.cross_entropy(logits[:, task.label_ids], y)
    torch.testing.assert_close(task_loss(model, task, x, y, over="vocab"), full)
    torch.testing.assert_close(task_loss(model, task, x, y), classes)
    with pytest.raises(ValueError, match="over='all'"):
        task_loss(model, task, x, y, over="all")


def test_class_scores_give_the_accuracy_and_the_class_loss():
    model = load_model("tiny-llama", seed=0).model
    task = toy_task()
    scores, labels = class_scores(model, task, split="train", batch_size=7)
    assert scores.shape == (len(task.train_ids), 6)
    assert (scores.argmax(-1) == labels).float().mean().item() == evaluate(model, task, split="train")
    torch.testing.assert_close(torch.nn.functional.cross_entropy(scores, labels),
                               task_loss(model, task, task.train_ids, task.train_labels), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="split='dev'"):
        evaluate(model, task, split="dev")


class WordTokenizer:
    """Each word with its leading space is one token (ids handed out on first sight), like a BPE on these texts."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        import re

        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in re.findall(r" ?\S+", text)]}


def test_source_task_asks_for_the_kind_of_text_and_tests_on_unseen_documents(monkeypatch):
    from types import SimpleNamespace

    import effref.data
    import effref.finetune

    def documents(tag):  # the first four fifths use words "<t>e…", the last fifth "<t>z…" (t: the tag's initial)
        words = [f"{tag[0]}e{i % 50}" for i in range(8000)] + [f"{tag[0]}z{i % 50}" for i in range(2000)]
        return " ".join(words)

    monkeypatch.setattr(effref.finetune, "_austen_texts", lambda: {"emma": documents("novel")})
    monkeypatch.setattr(effref.data, "load_corpus", lambda name: SimpleNamespace(
        train=documents(name), validation="", test=""))
    tokenizer = WordTokenizer()
    task = effref.finetune.source_task(tokenizer, passage_tokens=8, train_per_class=5, test_per_class=3)
    assert task.classes == ("fiction", "license", "Python manual", "Python code")  # sorted corpus names
    assert task.label_ids.tolist() == [tokenizer.vocab[w] for w in (" novel", " license", " manual", " program")]
    suffix = tokenizer("\nThis text is from a")["input_ids"]
    assert task.train_ids.shape == (20, 8 + len(suffix)) and task.test_ids.shape == (12, 8 + len(suffix))
    assert task.train_ids[:, 8:].eq(torch.tensor(suffix)).all()
    words = {i: w for w, i in tokenizer.vocab.items()}
    for ids, labels, part in ((task.train_ids, task.train_labels, "e"), (task.test_ids, task.test_labels, "z")):
        for row, label in zip(ids[:, :8].tolist(), labels.tolist()):
            assert all(words[i].strip().startswith("nlps"[label] + part) for i in row[1:]), (part, label, row)


def test_accuracy_se_is_the_spread_of_a_mean_of_hits_and_refuses_nonsense():
    hits = torch.tensor([1.0] * 57 + [0.0] * 135)  # 57 of 192 right
    assert accuracy_se(hits.mean().item(), 192) == pytest.approx(hits.std(unbiased=False).item() / 192 ** 0.5)
    assert accuracy_se(1.0, 50) == accuracy_se(0.0, 50) == 1 / 50  # the resolution of 50 passages, not zero
    for accuracy, n in ((1.5, 10), (0.5, 0), (0.5, 2.0)):
        with pytest.raises(ValueError, match="accuracy="):
            accuracy_se(accuracy, n)
