"""SpecInfer, Medusa, LLMA and Jacobi/Lookahead: each must reproduce greedy decoding token for token, each
proposer must build the tree its rule says (checked by hand on small cases), and Medusa-1 training must teach
the heads the future tokens of a text."""

from __future__ import annotations

import pytest
import torch

import effref.assets
from effref.inference.decoding import tree_depths
from effref.inference.drafts import layer_skip_draft
from effref.inference.llma import ReferenceProposer, llma_generate
from effref.inference.lookahead import LookaheadConfig, LookaheadProposer, lookahead_generate
from effref.inference.medusa import MedusaHeads, MedusaProposer, medusa_generate, train_medusa_heads
from effref.inference.specinfer import DraftTreeProposer, specinfer_generate


@pytest.mark.parametrize("branching", [(2, 2, 1), (3,), (1, 1, 1, 1), (2, 1, 3)])
def test_specinfer_output_is_greedy_decoding(tiny_llama, random_ids, branching) -> None:
    model = tiny_llama()
    draft = layer_skip_draft(model, 2)
    for seed in range(2):
        prompt = random_ids(1, 6, seed=seed)
        result = specinfer_generate(model, draft, prompt, 25, branching)
        assert torch.equal(result.tokens, model.generate(prompt, 25))
        assert result.draft_calls == len(branching) * result.target_calls


def test_specinfer_tree_holds_the_drafts_top_k_children(tiny_llama, random_ids) -> None:
    model = tiny_llama()
    draft = layer_skip_draft(model, 1)
    history = random_ids(1, 6)[0].tolist()
    proposer = DraftTreeProposer(draft, (3, 2), max_len=32)
    tokens, parents = proposer.propose(history, torch.zeros(32))
    assert len(tokens) == proposer.max_nodes == 1 + 3 + 6 and tree_depths(parents).tolist() == [0] + [1] * 3 + [2] * 6
    with torch.no_grad():
        root_logits = draft(torch.tensor([history]))[0, -1]
        assert tokens[1:4] == root_logits.topk(3).indices.tolist()
        for node in (1, 2, 3):  # each depth-1 node's children: the draft's top 2 after root + that node
            after = draft(torch.tensor([history + [tokens[node]]]))[0, -1].topk(2).indices.tolist()
            assert [t for t, p in zip(tokens, parents) if p == node] == after
    assert proposer.cache.length == len(history)  # the tree was forgotten, the committed text kept


def test_medusa_output_is_greedy_decoding_and_tree_is_cartesian(tiny_llama, random_ids) -> None:
    model = tiny_llama()
    heads = MedusaHeads(model.cfg.d_model, n_heads=2)
    with torch.no_grad():
        for layer in heads.residual:
            layer.weight.normal_(std=0.5)
    prompt = random_ids(1, 6)
    assert torch.equal(medusa_generate(model, heads, prompt, 25, (3, 2)).tokens, model.generate(prompt, 25))
    tokens, parents = MedusaProposer(heads, model.lm_head, (3, 2)).propose([5, 7], torch.randn(32))
    assert len(tokens) == 1 + 3 + 9 // 3 * 2 and parents[:4] == [-1, 0, 0, 0]
    assert tokens[4:6] == tokens[6:8] == tokens[8:10]  # head 2's top-2 under every head-1 candidate


def test_medusa_heads_learn_the_tokens_two_and_three_ahead(tiny_llama) -> None:
    """On a text that is a fixed cycle of tokens, the future is a function of the present: trained heads must
    predict it, whatever the backbone does."""
    model = tiny_llama(scale=1.0)
    cycle = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:11]
    text = cycle.repeat(60)  # (660,)
    heads = MedusaHeads(model.cfg.d_model, n_heads=2)
    losses = train_medusa_heads(model, heads, text, steps=150, seq_len=64, n_windows=6, positions_per_step=64,
                                lr=3e-2)
    assert losses[-1] < 0.2 * losses[0]
    with torch.no_grad():
        hidden = model.norm.register_forward_hook(lambda m, a, out: setattr(m, "seen", out))
        model(text[None, :40])
        hidden.remove()
        guesses = heads(model.norm.seen[0], model.lm_head).argmax(-1)  # (2, 40)
    for k in range(2):
        accuracy = (guesses[k, :40 - k - 2] == text[k + 2:40]).float().mean()
        assert accuracy > 0.9


def test_llma_copies_the_reference_and_stays_greedy(tiny_llama, random_ids) -> None:
    model = tiny_llama()
    prompt = random_ids(1, 6)
    reference = model.generate(prompt, 40)[0]
    result = llma_generate(model, prompt, 40, reference[3:30], match_len=2, copy_len=6)
    assert torch.equal(result.tokens[0], reference)
    assert result.emitted[:3] == [7, 7, 7]  # whole copies accepted (+ the bonus) while the reference lasts
    proposer = ReferenceProposer([1, 2, 3, 4, 5, 1, 2, 9], match_len=2, copy_len=3)
    assert proposer.propose([7, 1, 2], torch.zeros(1)) == ([2, 3, 4, 5], [-1, 0, 1, 2])
    assert proposer.propose([7, 8], torch.zeros(1)) == ([8], [-1])


@pytest.mark.parametrize("config", [LookaheadConfig(), LookaheadConfig(window=3, ngram=4, candidates=2),
                                    LookaheadConfig(candidates=0), LookaheadConfig(window=1, ngram=2)])
def test_jacobi_and_lookahead_output_is_greedy_decoding(tiny_llama, random_ids, config) -> None:
    model = tiny_llama()
    prompt = random_ids(1, 6)
    assert torch.equal(lookahead_generate(model, prompt, 30, config).tokens, model.generate(prompt, 30))


def test_lookahead_pool_holds_the_diagonal_ngrams() -> None:
    proposer = LookaheadProposer(LookaheadConfig(window=2, ngram=2, candidates=1))
    proposer.propose([10, 11], torch.zeros(1))  # root at position 1; guesses for positions 2, 3
    proposer.observe([11, 20, 21], [-1, 0, 1], [30, 31, 32], [0])  # update: pos 2 -> 30, 3 -> 31, 4 -> 32
    proposer.propose([10, 11, 30], torch.zeros(1))  # root at position 2
    proposer.observe([30, 31, 32], [-1, 0, 1], [40, 41, 42], [0, 1])  # pos 3 -> 40, 4 -> 41, 5 -> 42
    # diagonals (position a from the older update, a + 1 from the newer): (31, 41) and (32, 42); (30, 40)
    assert proposer.pool == {30: {(40,): None}, 31: {(41,): None}, 32: {(42,): None}}
    tokens, _ = proposer.propose([10, 11, 30, 31, 41], torch.zeros(1))
    assert proposer.guesses == {5: 42} and tokens[0] == 41


@pytest.mark.parametrize("make, message", [
    (lambda m: DraftTreeProposer(m, (), 8), "branching=\\(\\)"),
    (lambda m: DraftTreeProposer(m, (2, 0), 8), "branching=\\(2, 0\\)"),
    (lambda m: MedusaProposer(MedusaHeads(32, 2), m.lm_head, (2, 2, 2)), "1..2 entries"),
    (lambda m: MedusaHeads(32, 0), "n_heads=0"),
    (lambda m: ReferenceProposer([1, 2], match_len=2), "more than match_len=2"),
    (lambda m: ReferenceProposer([1, 2, 3], copy_len=0), "copy_len=0"),
    (lambda m: LookaheadConfig(ngram=1), "ngram=1"),
    (lambda m: LookaheadConfig(window=0), "window=0"),
])
def test_bad_arguments_are_rejected(tiny_llama, make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(tiny_llama())


def test_specinfer_rejects_mismatched_vocabularies(tiny_llama, random_ids) -> None:
    with pytest.raises(ValueError, match="draft vocab_size=32"):
        specinfer_generate(tiny_llama(), tiny_llama(vocab=32), random_ids(1, 4, vocab=32), 5)


@pytest.mark.slow
def test_tree_methods_on_smollm2_equal_greedy_decoding() -> None:
    if not effref.assets.is_available("smollm2-135m"):
        pytest.skip("SmolLM2-135M is not fetched (python -m effref.assets fetch smollm2-135m)")
    from effref.models import load_model

    model, tokenizer, _ = load_model("smollm2-135m", impl="effref")
    prompt = torch.tensor([tokenizer.encode("It is a truth universally acknowledged, that a single man")])
    reference = model.generate(prompt, 20)
    assert torch.equal(specinfer_generate(model, layer_skip_draft(model, 20), prompt, 20, (2, 1)).tokens, reference)
    assert torch.equal(lookahead_generate(model, prompt, 20).tokens, reference)
    assert torch.equal(llma_generate(model, prompt, 20, reference[0]).tokens, reference)
