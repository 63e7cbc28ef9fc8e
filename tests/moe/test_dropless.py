"""Dropless grouped computation against the expert-by-expert reference; the padded buffer against both."""

import pytest
import torch

from effref.moe import (
    Experts,
    Routing,
    TopKRouter,
    apply_experts,
    block_sparse_rows,
    dropless_experts,
    fits_capacity,
    padded_experts,
)


def setup(T=48, D=16, E=6, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    router, experts = TopKRouter(D, E, k), Experts(E, D, 12)
    with torch.no_grad():
        router.gate.weight.copy_(2 * torch.randn(E, D, generator=g))  # unbalanced: loads differ a lot
        for p in experts.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    x = torch.randn(T, D, generator=g, requires_grad=True)
    return x, router(x), experts


def grads(fn, x, routing, experts):
    for p in (x, *experts.parameters()):
        p.grad = None
    y = fn(x, routing, experts)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward(retain_graph=True)
    return y.detach(), [p.grad.clone() for p in (x, *experts.parameters())]


@pytest.mark.parametrize("E, k", [(1, 1), (6, 2), (8, 1), (5, 5)])
def test_dropless_equals_the_expert_loop_in_outputs_and_gradients(E, k):
    x, routing, experts = setup(E=E, k=k)
    y_ref, g_ref = grads(apply_experts, x, routing, experts)
    y, g = grads(dropless_experts, x, routing, experts)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_dropless_handles_experts_without_tokens_and_empty_routings():
    x, full, experts = setup(E=6, k=1, seed=3)
    keep = full.expert != 2
    routing = Routing(full.token[keep], full.expert[keep], full.weight[keep], full.probs, full.aux_loss)
    assert routing.load()[2] == 0  # expert 2 gets nothing: its group is empty
    torch.testing.assert_close(dropless_experts(x, routing, experts), apply_experts(x, routing, experts))
    empty = Routing(routing.token[:0], routing.expert[:0], routing.weight[:0], routing.probs, routing.aux_loss)
    assert torch.equal(dropless_experts(x, empty, experts), torch.zeros_like(x))


def test_padded_buffer_with_room_for_everyone_equals_dropless():
    x, routing, experts = setup()
    room = int(routing.load().max())
    torch.testing.assert_close(padded_experts(x, routing, experts, room), dropless_experts(x, routing, experts))


@pytest.mark.parametrize("C", [1, 4, 9])
def test_padded_buffer_drops_what_does_not_fit(C):
    x, routing, experts = setup()
    kept, _ = fits_capacity(routing.expert, experts.n_experts, C)
    truncated = Routing(routing.token[kept], routing.expert[kept], routing.weight[kept], routing.probs,
                        routing.aux_loss)
    assert not kept.all()  # something is dropped, so the comparison means something
    torch.testing.assert_close(padded_experts(x, routing, experts, C), apply_experts(x, truncated, experts))


def test_block_sparse_rows_pad_each_group_to_the_block():
    assert block_sparse_rows([0, 1, 128, 129], block=128) == 0 + 128 + 128 + 256
    assert block_sparse_rows(torch.tensor([5, 7]), block=1) == 12


@pytest.mark.parametrize("call, message", [
    (lambda x, r, e: padded_experts(x, r, e, 0), "capacity=0"),
    (lambda x, r, e: dropless_experts(x[:3], r, e), "x must be"),
    (lambda x, r, e: block_sparse_rows([1], block=0), "block=0"),
])
def test_bad_arguments_are_refused(call, message):
    x, routing, experts = setup()
    with pytest.raises(ValueError, match=message):
        call(x, routing, experts)
