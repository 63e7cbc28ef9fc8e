"""LLMLingua-style compression: exact budgets, protected spans, and the information ranking by brute force."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prompting.helpers import CharTokenizer, tiny_llama

from effref.prompting import (
    budget,
    compress_prompt,
    compress_tokens,
    protected_mask,
    select_tokens,
    token_information,
)

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = tiny_llama()


@given(n=st.integers(1, 60), ratio=st.floats(0.01, 1.0), n_protected=st.integers(0, 60), seed=st.integers(0, 99))
@settings(max_examples=200, deadline=None)
def test_select_tokens_keeps_exactly_the_budget_and_every_protected_token(n, ratio, n_protected, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, generator=g)
    protected = torch.zeros(n, dtype=torch.bool)
    protected[torch.randperm(n, generator=g)[:min(n_protected, budget(n, ratio))]] = True
    mask = select_tokens(scores, budget(n, ratio), protected)
    assert int(mask.sum()) == budget(n, ratio) and bool(mask[protected].all())
    free = mask & ~protected  # the kept unprotected tokens are the best-scoring ones
    if free.any() and (~mask & ~protected).any():
        assert scores[free].min() >= scores[~mask & ~protected].max()


@pytest.mark.parametrize("ratio", [0.1, 0.33, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("segment_len", [7, 16, 100])
def test_iterative_compression_keeps_the_requested_ratio_and_the_protected_span(ratio, segment_len):
    ids = torch.randint(0, 128, (50,), generator=torch.Generator().manual_seed(1))
    protected = torch.zeros(50, dtype=torch.bool)
    protected[20:24] = True
    mask = compress_tokens(MODEL, ids, ratio, protected, segment_len=segment_len)
    assert int(mask.sum()) == budget(50, ratio)
    assert bool(mask[20:24].all())


def test_one_segment_keeps_the_highest_information_tokens():
    ids = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(2))
    info = torch.cat([torch.tensor([float("inf")]), token_information(MODEL, ids)])  # the first: no context
    mask = compress_tokens(MODEL, ids, 0.4, segment_len=30)
    assert set(torch.nonzero(mask)[:, 0].tolist()) == set(torch.topk(info, 12).indices.tolist())


def test_later_segments_are_scored_on_the_compressed_prefix():
    """Segment 2's scores condition on segment 1's kept tokens only: recompute them by hand."""
    ids = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(3))
    mask = compress_tokens(MODEL, ids, 0.5, segment_len=12)
    kept_first = ids[:12][mask[:12]]
    info = token_information(MODEL, torch.cat([kept_first, ids[12:]]))[-12:]
    expected = set((12 + torch.topk(info, 6).indices).tolist())
    assert set(torch.nonzero(mask[12:])[:, 0].add(12).tolist()) == expected


def test_compress_prompt_meets_the_ratio_and_keeps_protected_text_verbatim():
    tok = CharTokenizer()
    demos = [f"Passage: the quick brown fox number {i} jumps.\nNovel: Emma\n\n" for i in range(6)]
    out = compress_prompt(MODEL, tok, "Name the novel.\n", demos, "Passage: a dull day.\nNovel:", ratio=0.5,
                          question_ratio=1.0, protect=["Novel:"])
    assert len(out.ids) == budget(out.original_tokens, 0.5)  # every demonstration fits k · B_dem here
    assert out.text.count("Novel:") == 1 + sum(1 for i in out.kept_demonstrations)  # every kept "Novel:" intact
    assert out.text.endswith("Passage: a dull day.\nNovel:")  # the question kept whole at question_ratio=1
    assert out.ratio <= 0.5


def test_protected_mask_flags_the_tokens_of_every_occurrence():
    ids, mask = protected_mask(CharTokenizer(), "ab Novel: cd Novel:", ["Novel:"])
    assert len(ids) == 19
    assert torch.nonzero(mask)[:, 0].tolist() == [3, 4, 5, 6, 7, 8, 13, 14, 15, 16, 17, 18]


@pytest.mark.parametrize("call, message", [
    (lambda: compress_tokens(MODEL, torch.arange(10), 0.0), r"ratio=0.0 must be in \(0, 1\]"),
    (lambda: compress_tokens(MODEL, torch.arange(10), 1.5), r"ratio=1.5 must be in \(0, 1\]"),
    (lambda: compress_tokens(MODEL, torch.arange(10), 0.2, torch.ones(10, dtype=torch.bool)),
     "protected spans hold 10 tokens but ratio=0.2 keeps 2"),
    (lambda: compress_tokens(MODEL, torch.arange(0), 0.5), "non-empty"),
    (lambda: compress_tokens(MODEL, torch.arange(10), 0.5, keep=3), "exactly one of ratio"),
    (lambda: compress_tokens(MODEL, torch.arange(10), keep=11), "keep=11 must be between 1 and the 10"),
    (lambda: compress_prompt(MODEL, CharTokenizer(), "instruction", ["demo"], "question", 0.3),
     "lower instruction_ratio"),
    (lambda: compress_prompt(MODEL, CharTokenizer(), "", ["a long demonstration text"], "q", 0.2,
                             protect=["long demonstration"]), "protected spans hold"),
    (lambda: compress_prompt(MODEL, CharTokenizer(), "", [], "", 0.5), "prompt is empty"),
])
def test_bad_input_is_refused_with_the_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_the_coarse_step_keeps_the_highest_perplexity_demonstrations_within_k_times_the_budget():
    tok = CharTokenizer()
    demos = ["aaaaaaaaaaaaaaaaaaaa", "the cat sat on a mat", "zq xv jk wp ly fm hb", "ababababababababab.."]
    ppl = [float(token_information(MODEL, torch.tensor(tok(d).input_ids)).mean()) for d in demos]
    out = compress_prompt(MODEL, tok, "", demos, "q", ratio=0.3, granularity=1.0)
    b_dem = budget(81, 0.3) - 1  # the question's one token keeps its ratio of 1
    fitting, used = [], 0
    for i in sorted(range(4), key=lambda i: -ppl[i]):  # highest perplexity first, while k · B_dem holds
        if used + 20 <= b_dem:
            fitting.append(i)
            used += 20
    assert out.kept_demonstrations == sorted(fitting) and len(fitting) < 4
