"""Megatron tensor parallelism on real gloo ranks equals the single-process module (torch's own attention)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effref.distributed.launch import run_ranks
from effref.distributed.tensor_parallel import (
    ColumnParallelLinear,
    DenseBlock,
    ParallelBlock,
    ParallelMLP,
    ParallelSelfAttention,
    RowParallelLinear,
    traffic,
)

TARGET = f"{__file__}:%s"
B, T, D, HEADS = 2, 5, 16, 4


def make_inputs():
    torch.manual_seed(0)
    block = DenseBlock(D, HEADS)
    for p in block.parameters():  # non-trivial norms and biases, so a missed term shows
        p.data.add_(0.1 * torch.randn_like(p))
    return block, torch.randn(B, T, D), torch.randn(B, T, D)


def parts_worker():
    """Each part's output and gradients on this rank: linears, MLP, attention, and the traffic they cost."""
    block, x, probe = make_inputs()
    out = {}
    col, row = ColumnParallelLinear.from_linear(block.up), RowParallelLinear.from_linear(block.down)
    x_col = x.clone().requires_grad_()
    y_slice = col(x_col)
    (y_slice.square().sum()).backward()
    out["col"] = (y_slice.detach(), x_col.grad, col.weight.grad)
    hidden = torch.randn(B, T, 4 * D, generator=torch.Generator().manual_seed(1))
    width = 4 * D // torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    y = row(hidden[..., rank * width:(rank + 1) * width])
    (y * probe).sum().backward()
    out["row"] = (y.detach(), row.weight.grad, row.bias.grad)
    parts = {"mlp": ParallelMLP(block.up, block.down), "attn": ParallelSelfAttention(block.attn),
             "block": ParallelBlock(block)}
    for name, part in parts.items():
        x_in = x.clone().requires_grad_()
        before = dict(traffic)
        y = part(x_in)
        (y * probe).sum().backward()
        moved = {key: traffic[key] - before[key] for key in traffic}
        out[name] = (y.detach(), x_in.grad, {n: p.grad for n, p in part.named_parameters()}, moved)
    return out


def reference():
    block, x, probe = make_inputs()
    x = x.requires_grad_()
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    results = {}
    for name, fn in [("mlp", lambda z: block.down(F.gelu(block.up(z)))),
                     ("attn", lambda z: block.attn(z, z, z, attn_mask=causal, need_weights=False)[0]),
                     ("block", block)]:
        block.zero_grad()
        x.grad = None
        y = fn(x)
        (y * probe).sum().backward()
        results[name] = (y.detach(), x.grad.clone(),
                         {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None})
    return block, x, results


def shard_of(full, rank, world):
    """Expected shards of a ParallelBlock's tensors, cut by hand from the full block's tensors ``full``."""
    hd, h = D // world, 4 * D // world
    qkv_rows = torch.cat([torch.arange(k * D + rank * hd, k * D + (rank + 1) * hd) for k in range(3)])
    heads, hidden, whole = (slice(rank * hd, (rank + 1) * hd), slice(rank * h, (rank + 1) * h), slice(None))
    cuts = {"attn.qkv.weight": ("attn.in_proj_weight", qkv_rows, whole),
            "attn.qkv.bias": ("attn.in_proj_bias", qkv_rows, None),
            "attn.out.weight": ("attn.out_proj.weight", whole, heads),
            "attn.out.bias": ("attn.out_proj.bias", whole, None),
            "mlp.up.weight": ("up.weight", hidden, whole), "mlp.up.bias": ("up.bias", hidden, None),
            "mlp.down.weight": ("down.weight", whole, hidden), "mlp.down.bias": ("down.bias", whole, None),
            **{f"{norm}.{kind}": (f"{norm}.{kind}", whole, None)
               for norm in ("norm1", "norm2") for kind in ("weight", "bias")}}
    return {name: full[source][rows] if cols is None else full[source][rows][:, cols]
            for name, (source, rows, cols) in cuts.items() if full.get(source) is not None}


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(TARGET % "parts_worker", 2, timeout_s=120)


def test_column_and_row_parallel_linears_equal_the_full_linear(two_ranks):
    block, x, _ = reference()
    full_y = block.up(x)
    x_grad = torch.autograd.grad(full_y.square().sum(), x)[0]
    torch.testing.assert_close(torch.cat([r["col"][0] for r in two_ranks], dim=-1), full_y.detach())
    for rank, result in enumerate(two_ranks):  # f's backward all-reduce gives every rank the whole ∂L/∂X
        torch.testing.assert_close(result["col"][1], x_grad)
    hidden = torch.randn(B, T, 4 * D, generator=torch.Generator().manual_seed(1))
    _, _, probe = make_inputs()
    block.zero_grad()
    full_row = block.down(hidden)
    torch.testing.assert_close(two_ranks[0]["row"][0], full_row.detach())
    torch.testing.assert_close(two_ranks[1]["row"][0], full_row.detach())
    (full_row * probe).sum().backward()
    torch.testing.assert_close(torch.cat([r["row"][1] for r in two_ranks], dim=1), block.down.weight.grad)


@pytest.mark.parametrize("part", ["mlp", "attn", "block"])
def test_split_parts_equal_the_single_process_module(two_ranks, part):
    _, _, results = reference()
    y, x_grad, full_grads = results[part]
    for rank, result in enumerate(two_ranks):
        got_y, got_x_grad, got_grads, _ = result[part]
        torch.testing.assert_close(got_y, y, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_x_grad, x_grad, atol=1e-5, rtol=1e-5)
        expected = shard_of(full_grads, rank, 2)
        prefix = {"mlp": "mlp.", "attn": "attn.", "block": ""}[part]
        for name, grad in got_grads.items():
            torch.testing.assert_close(grad, expected[prefix + name], atol=1e-5, rtol=1e-5)


def test_a_block_all_reduces_twice_forward_and_twice_backward(two_ranks):
    for result in two_ranks:
        assert result["block"][3] == {"all_reduce_calls": 4, "all_reduce_bytes": 4 * B * T * D * 4}
        assert result["mlp"][3] == {"all_reduce_calls": 2, "all_reduce_bytes": 2 * B * T * D * 4}


def optimizer(model):
    # SGD with momentum, not Adam: the key bias's gradient is zero in exact arithmetic (softmax ignores a
    # shift shared by all keys), and Adam's division by √v would blow its float noise up to full-size steps.
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def train_worker(steps):
    """A few SGD steps of a two-block model, split over the ranks; losses and final shards."""
    torch.manual_seed(0)
    blocks = [DenseBlock(D, HEADS) for _ in range(2)]
    x, y = torch.randn(B, T, D), torch.randn(B, T, D)
    model = nn.Sequential(*[ParallelBlock(b) for b in blocks])
    opt = optimizer(model)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach() for n, p in model.named_parameters()}


def test_training_steps_follow_the_single_process_trajectory():
    steps, world = 4, 4
    results = run_ranks(TARGET % "train_worker", world, steps, timeout_s=150)
    torch.manual_seed(0)
    blocks = [DenseBlock(D, HEADS) for _ in range(2)]
    x, y = torch.randn(B, T, D), torch.randn(B, T, D)
    model = nn.Sequential(*blocks)
    opt = optimizer(model)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for rank, (got_losses, params) in enumerate(results):
        assert got_losses == pytest.approx(losses, rel=1e-5)
        for i, block in enumerate(blocks):
            expected = shard_of({n: p.detach() for n, p in block.named_parameters()}, rank, world)
            for name, value in expected.items():
                torch.testing.assert_close(params[f"{i}.{name}"], value, atol=2e-5, rtol=2e-5)


def errors_worker():
    messages = []
    for build in [lambda: ParallelSelfAttention(nn.MultiheadAttention(12, 4, batch_first=True)),
                  lambda: ColumnParallelLinear.from_linear(nn.Linear(4, 10)),
                  lambda: RowParallelLinear.from_linear(nn.Linear(10, 4)),
                  lambda: ParallelSelfAttention(nn.MultiheadAttention(12, 3))]:
        try:
            build()
            messages.append(None)
        except (ValueError, TypeError) as error:
            messages.append(str(error))
    return messages


def test_sizes_that_do_not_split_get_clear_errors():
    messages = run_ranks(TARGET % "errors_worker", 3, timeout_s=120)[0]
    assert "num_heads=4 is not divisible by the tensor-parallel world size 3" in messages[0]
    assert "out_features=10 is not divisible" in messages[1]
    assert "in_features=10 is not divisible" in messages[2]
    assert "batch_first=True" in messages[3]


def test_without_a_process_group_the_error_says_how_to_start_one():
    with pytest.raises(RuntimeError, match="init_distributed"):
        ColumnParallelLinear.from_linear(nn.Linear(4, 4))
