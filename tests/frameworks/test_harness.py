"""lm-eval on local task files against our own evaluation of the same requests: bits per byte and accuracy from
their definitions must equal what the harness reports for the same in-memory model."""

import importlib.util
import json

import pytest
from frameworks.helpers import tiny_hf_llama

from effref.assets import AssetMissingError
from effref.data import load_corpus
from effref.frameworks.harness import MC_TASK, PPL_TASK, harness_scores, make_tasks, our_scores

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from effref.assets import require

    try:
        return AutoTokenizer.from_pretrained(require("smollm2-135m"))
    except AssetMissingError as error:
        pytest.skip(f"smollm2-135m (its tokenizer) is not fetched: {error}")


def text() -> str:
    return load_corpus("austen").test[:60_000]


def test_make_tasks_writes_yaml_and_jsonl_with_the_answer_among_the_choices(tmp_path):
    folder = make_tasks(text(), tmp_path, n_docs=3, n_items=5)
    assert {p.name for p in folder.iterdir()} == {"docs.jsonl", "mc.jsonl", f"{PPL_TASK}.yaml", f"{MC_TASK}.yaml"}
    words = text().split()
    joined = " ".join(words)
    for line in (folder / "mc.jsonl").read_text().splitlines():
        item = json.loads(line)
        assert len(item["choices"]) == 4
        assert item["context"] + " " + item["choices"][item["label"]] in joined  # the answer continues the text


@pytest.mark.parametrize("kwargs, match", [({"n_choices": 1}, "n_choices"), ({"n_docs": 10_000}, "need at least")])
def test_make_tasks_refuses_bad_settings(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_tasks(text(), tmp_path, **kwargs)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
def test_harness_equals_our_evaluation_of_the_same_requests(tmp_path, tokenizer):
    model = tiny_hf_llama(vocab_size=len(tokenizer), seed=2)
    folder = make_tasks(text(), tmp_path, n_docs=2, doc_words=30, n_items=4, context_words=12, choice_words=4)
    theirs = harness_scores(model, tokenizer, folder, batch_size=4)
    ours = our_scores(model, tokenizer, folder)
    assert theirs["bits_per_byte"] == pytest.approx(ours["bits_per_byte"], rel=1e-4)
    assert theirs["acc"] == pytest.approx(ours["acc"])
    assert theirs["byte_perplexity"] == pytest.approx(2 ** theirs["bits_per_byte"], rel=1e-6)  # the definition
