"""Tests for effref.data: corpus splits, tokenization and the calibration sampler.

Unit tests use the built-in sample text, a fake Austen folder in a temporary cache and tiny in-memory
tokenizers. Tests marked ``slow`` read the real fetched novels and skip when they are missing.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from effref.assets import AssetMissingError
from effref.data import (
    CORPORA,
    SAMPLE_PATH,
    SPLITS,
    Corpus,
    calibration_batches,
    load_corpus,
    split_paragraphs,
    tokenize,
)

# ---------------------------------------------------------------------------------------------------
# Corpus and splits
# ---------------------------------------------------------------------------------------------------

TINY = Corpus("tiny", train="a b c", validation="d", test="e", source="made up", split_note="by hand")


def test_corpus_split_returns_the_named_text_and_repr_stays_short():
    assert [TINY.split(name) for name in SPLITS] == ["a b c", "d", "e"]
    big = Corpus("big", "x" * 10**6, "y", "z", "made up", "note")
    assert len(repr(big)) < 200 and "1,000,000 chars" in repr(big)


@pytest.mark.parametrize("name", ["dev", "Train", "", "tests"])
def test_corpus_split_rejects_unknown_names(name):
    with pytest.raises(ValueError, match=re.escape(f"split name={name!r} is not known")):
        TINY.split(name)


def test_load_corpus_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"name='ptb' is not known; use one of \('austen', 'sample'"):
        load_corpus("ptb")
    assert CORPORA == ("austen", "sample", "wikitext2", "pydoc", "stdlib", "licenses")


def test_sample_corpus_is_the_shipped_file_cut_at_blank_lines():
    text = SAMPLE_PATH.read_text(encoding="utf-8")
    corpus = load_corpus("sample")
    assert f"{corpus.train}\n\n{corpus.validation}\n\n{corpus.test}" == text
    assert 10_000 < len(text) < 16_000 and text.startswith("PRIDE AND PREJUDICE")
    assert 0.7 < len(corpus.train) / len(text) < 0.9
    assert all(len(corpus.split(s)) > 500 for s in SPLITS)
    assert corpus.test.startswith(corpus.test.lstrip("\n"))  # cut right after a paragraph


def test_split_paragraphs_picks_the_nearest_blank_line():
    # 20 paragraphs of 9 chars + "\n\n": boundaries every 11 chars; compare with a brute-force search.
    paragraphs = [f"para {i:03d}." for i in range(20)]
    text = "\n\n".join(paragraphs)
    train, validation, test = split_paragraphs(text, (0.5, 0.25, 0.25))
    boundaries = [i for i in range(len(text)) if text[i:i + 2] == "\n\n"]
    best_first = min(boundaries, key=lambda b: abs(b - 0.5 * len(text)))
    assert train == text[:best_first]
    assert f"{train}\n\n{validation}\n\n{test}" == text
    assert {p for part in (train, validation, test) for p in part.split("\n\n")} == set(paragraphs)


@pytest.mark.parametrize("text, fractions, message", [
    ("a\n\nb\n\nc", (0.5, 0.5), r"three positive numbers summing to 1"),
    ("a\n\nb\n\nc", (0.8, 0.3, -0.1), r"three positive numbers summing to 1"),
    ("one paragraph only", (0.8, 0.1, 0.1), r"has 0 paragraph boundaries"),
    ("long first paragraph\n\nb\n\n", (0.8, 0.1, 0.1), r"leave an empty part"),
])
def test_split_paragraphs_bad_inputs(text, fractions, message):
    with pytest.raises(ValueError, match=message):
        split_paragraphs(text, fractions)


def _fake_austen(cache, monkeypatch) -> dict[str, str]:
    monkeypatch.setenv("EFFREF_CACHE", str(cache))
    folder = cache / "corpora" / "austen"
    folder.mkdir(parents=True)
    novels = {name: f"{name.upper()}\n\nline of {name}" for name in
              ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
               "sensesensibility")}
    for name, text in novels.items():
        (folder / f"{name}.txt").write_text(text)
    (folder / "provenance.json").write_text(json.dumps({"asset": "austen"}))
    return novels


def test_austen_split_assignment_on_a_fake_cache(tmp_path, monkeypatch):
    novels = _fake_austen(tmp_path, monkeypatch)
    corpus = load_corpus("austen")
    assert corpus.test == novels["emma"] and corpus.validation == novels["persuasion"]
    for name in ("mansfieldpark", "northangerabbey", "prideprejudice", "sensesensibility"):
        assert novels[name] in corpus.train
    assert "EMMA" not in corpus.train and "PERSUASION" not in corpus.train
    assert corpus.split_note.startswith("test = Emma; validation = Persuasion")


def test_austen_without_the_asset_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFREF_CACHE", str(tmp_path))
    with pytest.raises(AssetMissingError, match=re.escape("python -m effref.assets fetch austen")):
        load_corpus("austen")


def test_wikitext2_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail, as if absent
    with pytest.raises(AssetMissingError, match=r"not installed.*Hugging Face hub.*`pip install datasets`") as info:
        load_corpus("wikitext2")
    assert info.value.asset == "wikitext2"


# The domains every Python install has: pydoc topics, standard-library source, license texts.

def test_pydoc_corpus_is_the_sorted_topics_cut_at_blank_lines():
    from pydoc_data.topics import topics
    corpus = load_corpus("pydoc")
    whole = "\n\n".join(topics[key].strip("\n") for key in sorted(topics))
    assert f"{corpus.train}\n\n{corpus.validation}\n\n{corpus.test}" == whole
    assert 0.7 < len(corpus.train) / len(whole) < 0.9
    assert f"Python {sys.version_info.major}.{sys.version_info.minor}" in corpus.source


def test_stdlib_corpus_holds_module_source_and_splits_do_not_overlap():
    import sysconfig
    from pathlib import Path
    corpus = load_corpus("stdlib")
    folder = Path(sysconfig.get_paths()["stdlib"])
    assert (folder / "abc.py").read_text(encoding="utf-8").strip("\n") in corpus.train
    assert "def " in corpus.test and "import " in corpus.validation
    assert len(corpus.train) > 5 * len(corpus.test) and corpus.test not in corpus.train


def test_licenses_corpus_reads_the_folder_and_falls_back_to_package_licenses(tmp_path, monkeypatch):
    from effref import data
    folder = tmp_path / "licenses"
    folder.mkdir()
    paragraphs = [f"Clause {i}. You may copy this text." for i in range(30)]
    (folder / "B-LICENSE").write_text("\n\n".join(paragraphs[15:]))
    (folder / "A-LICENSE").write_text("\n\n".join(paragraphs[:15]))
    monkeypatch.setattr(data, "LICENSES_DIR", folder)
    corpus = load_corpus("licenses")
    assert corpus.train.startswith("Clause 0.") and corpus.test.endswith("Clause 29. You may copy this text.")
    assert "(2 documents)" in corpus.split_note
    monkeypatch.setattr(data, "LICENSES_DIR", tmp_path / "absent")
    fallback = load_corpus("licenses")
    assert "is missing here" in fallback.source and "torch" in fallback.source
    assert "license" in (fallback.train + fallback.test).lower()


# ---------------------------------------------------------------------------------------------------
# tokenize
# ---------------------------------------------------------------------------------------------------

class CountingTokenizer:
    """One id per character; counts calls, so the cache can be observed."""

    def __init__(self, name_or_path: str = "counting") -> None:
        self.name_or_path, self.calls = name_or_path, 0

    def __len__(self) -> int:
        return 256

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True):
        self.calls += 1
        ids = [ord(ch) % 256 for ch in text]
        return {"input_ids": [1, *ids] if add_special_tokens else ids}


def test_tokenize_adds_no_special_tokens_with_a_real_fast_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "[UNK]": 1, "it": 2, "is": 3, "a": 4, "truth": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="[UNK]")
    assert tokenizer("it is a truth")["input_ids"] == [0, 2, 3, 4, 5]  # the tokenizer would add BOS
    ids = tokenize(tokenizer, "it is a truth universally")
    assert ids.dtype == torch.long and ids.shape == (5,)
    assert ids.tolist() == [2, 3, 4, 5, 1]


def test_tokenize_caches_named_tokenizers_and_returns_copies():
    tokenizer = CountingTokenizer()
    first = tokenize(tokenizer, "Emma Woodhouse")
    first[0] = -1  # callers may scribble on their copy
    second = tokenize(tokenizer, "Emma Woodhouse")
    assert tokenizer.calls == 1 and second.tolist() == [ord(ch) for ch in "Emma Woodhouse"]
    tokenize(tokenizer, "Emma Woodhouse", cache=False)
    anonymous = CountingTokenizer(name_or_path="")
    tokenize(anonymous, "x")
    tokenize(anonymous, "x")
    assert tokenizer.calls == 2 and anonymous.calls == 2  # no cache without a name


@pytest.mark.parametrize("tokenizer, text, error, message", [
    (CountingTokenizer(), b"bytes", TypeError, r"text must be a str, got bytes"),
    ("gpt2", "text", TypeError, r"tokenizer='gpt2' is not callable"),
])
def test_tokenize_bad_inputs(tokenizer, text, error, message):
    with pytest.raises(error, match=message):
        tokenize(tokenizer, text)


# ---------------------------------------------------------------------------------------------------
# calibration_batches
# ---------------------------------------------------------------------------------------------------

def test_calibration_batches_are_contiguous_windows_of_ids():
    ids = torch.randperm(500, generator=torch.Generator().manual_seed(1))  # every window is unique
    batches = calibration_batches(ids, n=16, seq_len=40, seed=3)
    assert batches.shape == (16, 40) and batches.dtype == torch.long
    windows = {tuple(ids[s:s + 40].tolist()) for s in range(len(ids) - 40 + 1)}  # brute force
    assert all(tuple(row.tolist()) in windows for row in batches)


def test_calibration_batches_same_seed_same_batches_and_global_rng_untouched():
    ids = torch.arange(1000)
    state = torch.get_rng_state()
    first = calibration_batches(ids, 8, 32, seed=7)
    assert torch.equal(first, calibration_batches(ids, 8, 32, seed=7))
    assert not torch.equal(first, calibration_batches(ids, 8, 32, seed=8))
    assert torch.equal(state, torch.get_rng_state())


def test_calibration_batches_reach_every_start_including_both_ends():
    # 16 possible starts, 2,000 draws: missing one has probability 16 · (15/16)^2000 < 1e-50.
    ids = torch.arange(20)
    starts = calibration_batches(ids, n=2000, seq_len=5, seed=0)[:, 0]
    assert set(starts.tolist()) == set(range(16))
    assert torch.equal(calibration_batches(ids, 3, 20, seed=0), ids.expand(3, 20))  # seq_len = len(ids)


@pytest.mark.parametrize("ids, n, seq_len, message", [
    (torch.arange(10).reshape(2, 5), 1, 2, r"ids must be a 1-D tensor.*\(2, 5\)"),
    ([1, 2, 3], 1, 2, r"ids must be a 1-D tensor.*got list"),
    (torch.rand(10), 1, 2, r"ids has dtype torch.float32; token ids must be integers"),
    (torch.arange(10), 0, 2, r"n=0 must be an integer ≥ 1"),
    (torch.arange(10), 2.0, 2, r"n=2.0 must be an integer ≥ 1"),
    (torch.arange(10), 1, 1, r"seq_len=1 must be an integer ≥ 2"),
    (torch.arange(10), 1, 11, r"seq_len=11 is longer than the 10 ids available; use a shorter seq_len"),
])
def test_calibration_batches_bad_inputs(ids, n, seq_len, message):
    with pytest.raises(ValueError, match=message):
        calibration_batches(ids, n, seq_len)


# ---------------------------------------------------------------------------------------------------
# The real Austen corpus and tokenizer (slow; skipped when not fetched)
# ---------------------------------------------------------------------------------------------------

def _real_austen() -> Corpus:
    try:
        return load_corpus("austen")
    except AssetMissingError as error:
        pytest.skip(f"austen is not fetched: {error}")


@pytest.mark.slow
def test_real_austen_novels_and_split():
    from effref.assets import require

    corpus = _real_austen()
    folder = require("austen")
    names = sorted(p.stem for p in folder.glob("*.txt"))
    assert names == ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                     "sensesensibility"]
    total = sum(len(p.read_text(encoding="utf-8")) for p in folder.glob("*.txt"))
    assert 3.9e6 < total < 4.2e6
    assert corpus.test.startswith("EMMA\n\nBy Jane Austen")
    assert corpus.test.count("\n") + 1 == 16235  # janeaustenr's emma has 16,235 lines
    assert corpus.validation.startswith("Persuasion")
    opening = "Emma Woodhouse, handsome, clever, and rich"
    assert opening in corpus.test and opening not in corpus.train + corpus.validation
    assert "Sir Walter Elliot" not in corpus.train and "Elizabeth Bennet" in corpus.train


@pytest.mark.slow
def test_real_tokenizer_round_trips_the_sample_text():
    from effref.assets import require

    try:
        folder = require("smollm2-135m")
    except AssetMissingError as error:
        pytest.skip(f"smollm2-135m is not fetched: {error}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = load_corpus("sample").test
    ids = tokenize(tokenizer, text)
    assert ids.dim() == 1 and 200 < len(ids) < len(text) / 2
    assert tokenizer.bos_token_id not in ids.tolist()
    assert tokenizer.decode(ids) == text  # byte-level BPE loses nothing
