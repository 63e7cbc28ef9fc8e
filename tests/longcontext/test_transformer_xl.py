"""Transformer-XL: the relative score against its four terms written out, and segment-level recurrence against
one full pass (whole memory) and against a pass over exactly the remembered tokens (finite memory)."""

from __future__ import annotations

import math

import pytest
import torch

from effref.longcontext.transformer_xl import RelativeAttention, TransformerXL, sinusoid


def brute_relative_attention(attn, x, memory):
    """A^rel_ij = (a) + (b) + (c) + (d), one (head, i, j) at a time, then softmax over the visible keys."""
    B, T, d_model = x.shape
    h = torch.cat([memory, x], 1)
    S, M, H, dh = h.shape[1], memory.shape[1], attn.n_heads, attn.d_head
    q = attn.q_proj(x).view(B, T, H, dh)
    k, v = attn.k_proj(h).view(B, S, H, dh), attn.v_proj(h).view(B, S, H, dh)
    out = torch.zeros(B, T, H, dh, dtype=x.dtype)
    for head in range(H):
        for i in range(T):
            scores = []
            for j in range(M + i + 1):
                r = attn.r_proj(sinusoid(torch.tensor([M + i - j]), d_model).to(x.dtype))[0].view(H, dh)[head]
                a, b = (q[:, i, head] * k[:, j, head]).sum(-1), (q[:, i, head] * r).sum(-1)
                c, d = (attn.u_bias[head] * k[:, j, head]).sum(-1), (attn.v_bias[head] * r).sum()
                scores.append((a + b + c + d) / math.sqrt(dh))
            weights = torch.stack(scores, -1).softmax(-1)  # (B, M + i + 1)
            out[:, i, head] = (weights[..., None] * v[:, :M + i + 1, head]).sum(1)
    return attn.o_proj(out.reshape(B, T, d_model))


def test_relative_attention_equals_the_four_terms():
    torch.manual_seed(0)
    attn = RelativeAttention(16, 2).double()
    with torch.no_grad():
        attn.u_bias.normal_()
        attn.v_bias.normal_()
    x, memory = torch.randn(2, 4, 16, dtype=torch.float64), torch.randn(2, 3, 16, dtype=torch.float64)
    torch.testing.assert_close(attn(x, memory), brute_relative_attention(attn, x, memory))


def make_xl(mem_len, n_layers=2, seed=0):
    torch.manual_seed(seed)
    return TransformerXL(vocab_size=32, d_model=16, n_heads=2, n_layers=n_layers, d_ff=32, mem_len=mem_len).eval()


def read_in_segments(model, ids, segment):
    mems, logits = None, []
    for start in range(0, ids.shape[1], segment):
        out, mems = model(ids[:, start:start + segment], mems)
        logits.append(out)
    return torch.cat(logits, 1), mems


def test_a_memory_holding_everything_gives_the_full_pass():
    model, ids = make_xl(mem_len=64), torch.randint(0, 32, (2, 15))
    with torch.no_grad():
        segmented, mems = read_in_segments(model, ids, 5)
        torch.testing.assert_close(segmented, model(ids)[0], rtol=1e-5, atol=1e-5)
    assert [m.shape for m in mems] == [(2, 15, 16)] * 2


def test_a_finite_memory_sees_exactly_the_last_m_tokens_before_the_segment():
    """One layer, relative positions: token i of a segment starting at s equals a fresh pass over s − M … i."""
    M, segment = 4, 5
    model, ids = make_xl(mem_len=M, n_layers=1), torch.randint(0, 32, (2, 20))
    with torch.no_grad():
        segmented, mems = read_in_segments(model, ids, segment)
        for i in (7, 12, 19):
            start = i // segment * segment
            alone = model(ids[:, start - M:i + 1])[0][:, -1]
            torch.testing.assert_close(segmented[:, i], alone, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(segmented[:, 19], model(ids)[0][:, 19], atol=1e-4)  # the memory did cut
    assert mems[0].shape == (2, M, 16)


def test_no_gradient_flows_into_the_memory():
    model, ids = make_xl(mem_len=8), torch.randint(0, 32, (1, 10))
    model.train()
    _, mems = model(ids[:, :5])
    logits, _ = model(ids[:, 5:], mems)
    assert not any(m.requires_grad for m in mems)
    logits.sum().backward()  # reaches the weights through the current segment only
    assert model.embed.weight.grad is not None


@pytest.mark.parametrize("kwargs, match", [
    ({"mem_len": 0}, "mem_len=0 must be a positive integer"),
    ({"n_heads": 3}, "n_heads=3 must be a positive divisor of d_model=16"),
    ({"d_model": 15, "n_heads": 3}, "d_model=15 must be even"),
    ({"n_layers": 0}, "n_layers=0")])
def test_bad_sizes_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformerXL(**{"vocab_size": 32, "d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32, "mem_len": 4,
                         **kwargs})


def test_bad_memories_are_refused():
    model, ids = make_xl(mem_len=4), torch.randint(0, 32, (2, 5))
    _, mems = model(ids)
    with pytest.raises(ValueError, match="one .* tensor per layer"):
        model(ids, mems[:1])
    with pytest.raises(ValueError, match="one .* tensor per layer"):
        model(ids[:1], mems)
