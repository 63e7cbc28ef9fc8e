"""PagedDraft, the engine's batched draft: its proposals equal the draft model's own dense decoding, its q rows
are the draft's distributions, a full pool shortens drafts without corrupting a table, and ``sync`` keeps only
committed tokens."""

import pytest
import torch

from effref.inference.speculative import Sampling
from effref.models import load_model
from effref.serving.drafting import PagedDraft
from effref.serving.scheduler import Sequence

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    m = load_model("tiny-llama", impl="effref", seed=0).model
    with torch.no_grad():  # scaled up, so greedy continuations vary token to token (see test_engine_speculative)
        for p in m.blocks.parameters():
            if p.ndim == 2:
                p.mul_(10)
    return m


def running(request_id: int, prompt: list[int], output: list[int]) -> Sequence:
    """A decoding sequence whose target has computed every token but the newest."""
    seq = Sequence(request_id, prompt, 64, output=list(output), status="running")
    seq.num_computed = len(seq.tokens) - 1
    return seq


def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 9, 17, 30)]


def test_greedy_proposals_equal_the_draft_models_own_greedy_decoding(model):
    drafter = PagedDraft(model, num_blocks=64, block_size=4)
    seqs = [running(i, p, [7]) for i, p in enumerate(prompts())]
    wanted = [1, 4, 0, 3]
    drafts, q = drafter.propose(seqs, wanted, Sampling())
    for seq, n, got, rows in zip(seqs, wanted, drafts, q):
        ref = model.generate(torch.tensor([seq.tokens]), n)[0, len(seq.tokens):].tolist() if n else []
        assert got == ref and rows.shape[0] == n
    # a second step after one accepted draft per sequence: the cached prefix is reused, not recomputed
    for seq, got in zip(seqs, drafts):
        seq.output += got[:1] + [5]
        seq.num_computed = len(seq.tokens) - 1
    drafter.sync(seqs)
    drafts, _ = drafter.propose(seqs, [2] * 4, Sampling())
    for seq, got in zip(seqs, drafts):
        assert got == model.generate(torch.tensor([seq.tokens]), 2)[0, len(seq.tokens):].tolist()


def test_sampled_proposals_come_with_the_draft_distribution_they_were_drawn_from(model):
    drafter = PagedDraft(model, num_blocks=64, block_size=4)
    seqs = [running(i, p, [3]) for i, p in enumerate(prompts())]
    for i, seq in enumerate(seqs):
        seq.generator = torch.Generator().manual_seed(i)
    drafts, q = drafter.propose(seqs, [3] * 4, Sampling(temperature=0.7, top_k=20))
    for seq, got, rows in zip(seqs, drafts, q):
        for j, token in enumerate(got):
            logits = model(torch.tensor([seq.tokens + got[:j]]))[0, -1] / 0.7  # (vocab,)
            kth = logits.topk(20).values[-1]
            ref = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
            torch.testing.assert_close(rows[j], ref, atol=1e-5, rtol=1e-4)
            assert rows[j, token] > 0


def test_a_full_pool_leaves_the_table_as_it_was(model):
    drafter = PagedDraft(model, num_blocks=2, block_size=4)
    seq = running(0, [1, 2, 3, 4, 5, 6], [7])  # 7 tokens: both blocks after the first round
    drafts, _ = drafter.propose([seq], [1], Sampling())
    table = drafter.tables[0]
    assert len(drafts[0]) == 1 and table.num_tokens == 7 and drafter.manager.num_free == 0
    seq.output += [drafts[0][0], 9]  # two tokens to feed next, only one slot left: nothing is reserved
    seq.num_computed = len(seq.tokens) - 1
    drafter.sync([seq])
    drafts, _ = drafter.propose([seq], [2], Sampling())
    assert drafts == [[]] and table.tokens == seq.tokens[:7]  # the slot of the first one is given back too


def test_sync_keeps_committed_tokens_and_frees_sequences_that_stopped_running(model):
    drafter = PagedDraft(model, num_blocks=32, block_size=4)
    a, b = running(0, prompts()[1], [1]), running(1, prompts()[2], [2])
    drafts, _ = drafter.propose([a, b], [3, 3], Sampling())
    a.output += [drafts[0][0], 11]  # one draft accepted, then the target's own token
    a.num_computed = len(a.tokens) - 1
    drafter.sync([a])  # b finished or was preempted
    assert set(drafter.tables) == {0} and drafter.tables[0].tokens == a.tokens[:-1]
    drafter.sync([])
    assert not drafter.tables and drafter.manager.num_free == 32
