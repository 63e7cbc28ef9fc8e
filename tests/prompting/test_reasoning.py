"""Chain-of-thought prompts, the self-consistency vote and Skeleton-of-Thought's batched expansion."""

from collections import Counter

import pytest
from prompting.helpers import CharTokenizer, tiny_llama

from effref.prompting import (
    Exemplar,
    chain_of_thought_prompt,
    extract_answer,
    majority_vote,
    self_consistency,
    skeleton_of_thought,
    zero_shot_cot_prompt,
)
from effref.serving import Engine

pytestmark = pytest.mark.usefixtures("one_thread")


def test_chain_of_thought_prompt_shows_the_rationale_only_when_asked():
    shots = [Exemplar("2 + 3?", "2 plus 3 is 5.", "5")]
    assert chain_of_thought_prompt(shots, "4 + 1?") == "Q: 2 + 3?\nA: 2 plus 3 is 5. The answer is 5.\n\nQ: 4 + 1?\nA:"
    assert chain_of_thought_prompt(shots, "4 + 1?", reasoning=False) == "Q: 2 + 3?\nA: The answer is 5.\n\nQ: 4 + 1?\nA:"
    assert zero_shot_cot_prompt("4 + 1?").endswith("Let's think step by step.")


@pytest.mark.parametrize("text, answer", [
    (" 7 and 8 make 15. The answer is 15.\n\nQ: 9", "15"),
    (" 3 + 4 = 7\n\nQ: 1 + 1 = 2", "7"),
    (" It is -2.", "-2"),
    (" no digits here", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_majority_vote_on_constructed_samples():
    assert majority_vote(["3", "5", "5", None, "3", "5"]) == ("5", Counter({"5": 3, "3": 2}))
    assert majority_vote(["4", "9", "9", "4"])[0] == "4"  # a tie goes to the answer reached first
    assert majority_vote([None, None]) == (None, Counter())


def test_majority_of_noisy_samples_beats_one_sample():
    """A constructed sampler right with p = 0.4, wrong answers spread over 6 values: the vote of 15 is right far
    more often than one sample (expected ≈ 0.4 vs ≈ 0.8)."""
    import random
    rng = random.Random(0)
    single, voted = 0, 0
    for _ in range(300):
        samples = ["42" if rng.random() < 0.4 else str(rng.randrange(6)) for _ in range(15)]
        single += samples[0] == "42"
        voted += majority_vote(samples)[0] == "42"
    assert single / 300 < 0.5 and voted / 300 > 0.7


def test_self_consistency_samples_fork_from_one_prompt_and_reproduce_for_a_seed():
    model, tok = tiny_llama(), CharTokenizer()
    engine = Engine(model, num_blocks=128, block_size=8, max_batch=6)  # 12 samples: they wait their turn
    prompts = ["Q: 1+1\nA:", "Q: 2+2\nA:", "Q: 3+3\nA:"]
    answers = self_consistency(engine, tok, prompts, n_samples=4, max_new_tokens=6, seed=5,
                               extract=lambda text: text)
    assert [len(row) for row in answers] == [4, 4, 4]
    assert len(set(answers[0])) > 1  # sampling, not four greedy copies
    for p, prompt in enumerate(prompts):  # each prompt alone, with the seed its request had in the batch
        alone = engine.generate([tok(prompt).input_ids], 6, temperature=0.7, top_k=40, seed=5 + p, n_samples=4)
        assert [tok.decode(s) for s in alone] == answers[p]


class RecordingEngine:
    """Records every generate call; answers a numbered outline, then one text per expansion prompt."""

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def generate(self, prompts, max_new_tokens, **kwargs):
        self.calls.append((len(prompts), max_new_tokens))
        if len(self.calls) == 1:
            return [self.tok(" fields\n2. roads\n3. rivers\n").input_ids]
        return [self.tok(f" text {i}").input_ids for i in range(len(prompts))]


def test_skeleton_of_thought_expands_every_point_in_one_batched_call():
    tok = CharTokenizer()
    engine = RecordingEngine(tok)
    result = skeleton_of_thought(engine, tok, "Describe the village.", n_points=3, point_tokens=5)
    assert result.points == ["fields", "roads", "rivers"]
    assert engine.calls == [(1, 32), (3, 5)]  # the outline, then all three expansions in one call
    assert result.expansions == [" text 0", " text 1", " text 2"]


def test_skeleton_of_thought_on_the_serving_engine_equals_expanding_each_point_alone():
    model, tok = tiny_llama(), CharTokenizer()
    engine = Engine(model, num_blocks=64, block_size=8, max_batch=8)
    # the untrained model's outline is noise, but "1." + its first line is always one point to expand
    result = skeleton_of_thought(engine, tok, "q", n_points=3, outline_tokens=4, point_tokens=5)
    assert 1 <= len(result.points) == len(result.expansions)
    listed = "\n".join(f"{i}. {p}" for i, p in enumerate(result.points, 1))
    for i, (point, text) in enumerate(zip(result.points, result.expansions), 1):
        prompt = f"Question: q\nOutline:\n{listed}\nExpand point {i} ({point}) in one or two sentences.\nPoint {i}:"
        assert tok.decode(engine.generate([tok(prompt).input_ids], 5)[0]) == text  # batched = one at a time


@pytest.mark.parametrize("call, message", [
    (lambda: chain_of_thought_prompt([], " "), "question is empty"),
    (lambda: majority_vote([]), "answers is empty"),
    (lambda: self_consistency(None, CharTokenizer(), ["q"], n_samples=0, max_new_tokens=3), "n_samples=0"),
    (lambda: self_consistency(None, CharTokenizer(), ["q"], 2, 3, temperature=0.0), "temperature > 0"),
    (lambda: self_consistency(None, CharTokenizer(), [], 2, 3), "prompts is empty"),
    (lambda: skeleton_of_thought(None, CharTokenizer(), "q", n_points=0), "n_points=0"),
])
def test_bad_input_is_refused_with_the_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call()
