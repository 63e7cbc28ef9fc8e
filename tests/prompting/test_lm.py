"""The shared LM calls against our Llama's own forward (the independent reference)."""

import pytest
import torch
from prompting.helpers import CharTokenizer, tiny_llama

from effref.prompting import choice_logprobs, embed_texts, forward_embeds, run_layers, token_information

pytestmark = pytest.mark.usefixtures("one_thread")


def test_forward_from_embeddings_equals_the_model_forward():
    model = tiny_llama()
    ids = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(forward_embeds(model, model.embed(ids)), model(ids))


def test_continuing_after_cached_keys_equals_one_forward():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(2))
    _, past = run_layers(model, model.embed(ids[:, :12]))
    hidden, _ = run_layers(model, model.embed(ids[:, 12:]), past=past, offset=12)
    torch.testing.assert_close(model.lm_head(hidden), model(ids)[:, 12:])


def test_an_explicit_causal_mask_equals_none_and_a_blocked_key_changes_the_output():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    torch.testing.assert_close(forward_embeds(model, model.embed(ids), causal), model(ids))
    blocked = causal.clone()
    blocked[5:, 2] = False
    out = forward_embeds(model, model.embed(ids), blocked)
    torch.testing.assert_close(out[:, :5], model(ids)[:, :5])
    assert not torch.allclose(out[:, 5:], model(ids)[:, 5:])


def test_token_information_is_the_negative_log_probability_of_each_next_token():
    model = tiny_llama()
    ids = torch.randint(0, 128, (15,), generator=torch.Generator().manual_seed(4))
    logp = torch.log_softmax(model(ids[None])[0], -1)
    expected = torch.stack([-logp[t, ids[t + 1]] for t in range(14)])
    torch.testing.assert_close(token_information(model, ids), expected)


def test_choice_logprobs_of_right_padded_batches_equal_one_prompt_at_a_time():
    model = tiny_llama()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    got = choice_logprobs(model, prompts, [3, 4], batch_size=2)
    for row, p in enumerate(prompts):
        logp = torch.log_softmax(model(torch.tensor([p]))[0, -1], -1)
        torch.testing.assert_close(got[row], logp[[3, 4]])


def test_text_embeddings_are_mean_pooled_hidden_states():
    model, tok = tiny_llama(), CharTokenizer()
    emb = embed_texts(model, tok, ["abc", "hello"])
    ids = torch.tensor([tok("hello").input_ids])
    torch.testing.assert_close(emb[1], run_layers(model, model.embed(ids))[0][0].mean(0))


@pytest.mark.parametrize("call, message", [
    (lambda m: embed_texts(m, CharTokenizer(), []), "texts is empty"),
    (lambda m: embed_texts(m, CharTokenizer(), [""]), "has no tokens"),
    (lambda m: token_information(m, torch.tensor([3])), "at least 2"),
    (lambda m: choice_logprobs(m, [], [1]), "at least one of each"),
    (lambda m: forward_embeds(m, torch.zeros(1, 4, 7)), "d_model=32"),
    (lambda m: forward_embeds(m, torch.zeros(1, 4, 32), torch.ones(3, 3, dtype=torch.bool)), "mask must be"),
])
def test_bad_input_is_refused_with_the_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_llama())
