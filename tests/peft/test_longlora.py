"""S²-Attn equals full attention restricted to its (shifted) groups, built here by brute force."""

import pytest
import torch

from effref.models import load_model
from effref.peft.longlora import shifted_sparse_attention, use_s2_attention


def brute_force_mask(H, T, G):
    """allowed[h, i, j]: same group (shifted by G/2, wrapping around, for the second half of the heads) and j <= i."""
    allowed = torch.zeros(H, T, T, dtype=torch.bool)
    for h in range(H):
        shift = G // 2 if h >= H - H // 2 else 0  # the last H // 2 heads are shifted
        for i in range(T):
            for j in range(T):
                same = ((i - shift) % T) // G == ((j - shift) % T) // G
                allowed[h, i, j] = same and j <= i
    return allowed


@pytest.mark.parametrize("T, G, H", [(16, 4, 4), (24, 8, 4), (12, 12, 4), (16, 4, 3), (8, 2, 9)])
def test_s2_attention_equals_masked_full_attention(T, G, H):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, H, T, 8, generator=g) for _ in range(3))
    allowed = brute_force_mask(H, T, G)
    scores = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~allowed, float("-inf"))
    expected = scores.softmax(-1) @ v
    torch.testing.assert_close(shifted_sparse_attention(q, k, v, G), expected, rtol=1e-5, atol=1e-5)


def test_shift_pattern_by_brute_force():
    allowed = brute_force_mask(2, 8, 4)
    # head 0: groups {0..3}, {4..7}; head 1: groups {2..5}, {6, 7, 0, 1}
    assert allowed[0, 5].tolist() == [False, False, False, False, True, True, False, False]
    assert allowed[1, 5].tolist() == [False, False, True, True, True, True, False, False]
    assert allowed[1, 7].tolist() == [True, True, False, False, False, False, True, True]
    assert allowed[1, 1].tolist() == [True, True, False, False, False, False, False, False]  # no look-ahead
    assert int(allowed.sum(-1).max()) <= 4  # every query sees at most G keys


def test_group_as_long_as_the_sequence_is_full_attention_in_a_model():
    model = load_model("tiny-llama", seed=0).model
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    full = model(x).logits
    use_s2_attention(model, 16)
    torch.testing.assert_close(model(x).logits, full, rtol=1e-5, atol=1e-5)
    use_s2_attention(model, 4)
    assert not torch.allclose(model(x).logits, full, atol=1e-3)
    use_s2_attention(model, None)
    torch.testing.assert_close(model(x).logits, full)


@pytest.mark.parametrize("shape, G, match", [
    ((1, 1, 8, 4), 4, "none to shift"),
    ((1, 2, 8, 4), 3, "must be even and divide"),
    ((1, 2, 10, 4), 4, "must be even and divide"),
])
def test_s2_attention_rejects_bad_input(shape, G, match):
    q = torch.zeros(shape)
    with pytest.raises(ValueError, match=match):
        shifted_sparse_attention(q, q, q, G)


def test_s2_attention_refuses_cached_decoding_and_our_llama():
    model = use_s2_attention(load_model("tiny-llama", seed=0).model, 4)
    with pytest.raises(ValueError, match="KV cache"):
        model.generate(torch.zeros(1, 8, dtype=torch.long), max_new_tokens=2, do_sample=False)
    with pytest.raises(TypeError, match="not supported"):
        use_s2_attention(load_model("tiny-llama", impl="effref").model, 4)


def test_values_may_be_wider_than_keys():
    q = torch.zeros(1, 2, 8, 4)
    pattern = shifted_sparse_attention(q, q, torch.eye(8).expand(1, 2, 8, 8), 4)  # rows = attention weights
    torch.testing.assert_close(pattern.sum(-1), torch.ones(1, 2, 8))
    assert torch.equal(pattern > 0, brute_force_mask(2, 8, 4)[None])
