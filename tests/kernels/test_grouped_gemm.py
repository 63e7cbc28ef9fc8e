"""The grouped-GEMM kernel against one matmul per expert group, under the interpreter on CPU: uneven and empty
groups, groups that end inside a tile, a whole dropless MoE layer, the tile table, and the refusals."""

import pytest
import torch
import torch.nn.functional as F

from effref import kernels
from effref.kernels.grouped_gemm import (
    BENCHMARK,
    grouped_matmul,
    grouped_matmul_loop,
    grouped_matmul_padded,
    tile_table,
)
from effref.moe import Experts, dropless_experts
from effref.moe.experts import Routing

needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="Triton is not installed")
CPU = torch.device("cpu")


@needs_triton
@pytest.mark.parametrize("shape", [(4, 70, 24, 40), (3, 5, 16, 8), (1, 33, 8, 8)])
def test_kernel_equals_one_matmul_per_group(shape):
    rows, weights, sizes = BENCHMARK.make_inputs(shape, torch.float32, CPU)
    expected = grouped_matmul_loop(rows, weights, sizes)
    torch.testing.assert_close(grouped_matmul(rows, weights, sizes), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped_matmul_padded(rows, weights, sizes), expected, rtol=1e-5, atol=1e-5)


@needs_triton
def test_empty_groups_and_groups_ending_inside_a_tile():
    torch.manual_seed(0)
    sizes = [0, 1, 33, 0, 31, 2]  # tiles of 32 rows: 33 spills one row into a second tile
    rows, weights = torch.randn(sum(sizes), 16), torch.randn(len(sizes), 8, 16)
    torch.testing.assert_close(grouped_matmul(rows, weights, sizes), grouped_matmul_loop(rows, weights, sizes),
                               rtol=1e-5, atol=1e-5)


def test_tile_table_never_crosses_a_group():
    experts, starts, ends = tile_table([0, 5, 3, 0, 8], block_m=4)
    assert experts == [1, 1, 2, 4, 4]
    assert starts == [0, 4, 5, 8, 12]
    assert ends == [5, 5, 8, 16, 16]


@needs_triton
@torch.no_grad()
def test_a_dropless_moe_layer_through_the_kernel_equals_the_reference_layer():
    torch.manual_seed(1)
    T, D, E = 40, 16, 4
    experts = Experts(E, D, 24)
    x = torch.randn(T, D)
    token = torch.arange(T).repeat_interleave(2)  # top-2: every token routed twice
    expert = torch.randint(0, E, (2 * T,))
    routing = Routing(token=token, expert=expert, weight=torch.rand(2 * T), probs=torch.rand(T, E).softmax(-1),
                      aux_loss=torch.zeros(()))
    order = torch.sort(expert, stable=True).indices
    sizes = torch.bincount(expert, minlength=E)
    rows = x[token[order]]  # (A, D) grouped by expert
    hidden = F.silu(grouped_matmul(rows, experts.gate, sizes)) * grouped_matmul(rows, experts.up, sizes)
    out = grouped_matmul(hidden, experts.down, sizes) * routing.weight[order, None]  # (A, D)
    y = torch.zeros_like(x).index_add_(0, token[order], out)
    torch.testing.assert_close(y, dropless_experts(x, routing, experts), rtol=1e-5, atol=1e-5)


@needs_triton
def test_refusals_name_the_argument():
    rows, weights, sizes = BENCHMARK.make_inputs((3, 10, 8, 4), torch.float32, CPU)
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_matmul(rows, weights, sizes[:-1])
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_matmul(rows, weights, [sizes[0] + 1] + sizes[1:])
    with pytest.raises(ValueError, match="same K"):
        grouped_matmul(rows[:, :5], weights, sizes)
    with pytest.raises(TypeError, match="differ"):
        grouped_matmul(rows.double().float().half(), weights, sizes)


@needs_triton
def test_bf16_accumulates_in_fp32():
    rows, weights, sizes = BENCHMARK.make_inputs((4, 70, 24, 40), torch.bfloat16, CPU)
    y = grouped_matmul(rows, weights, sizes)
    assert y.dtype == torch.bfloat16
    exact = grouped_matmul_loop(rows.float(), weights.float(), sizes)
    torch.testing.assert_close(y.float(), exact, rtol=1e-2, atol=1e-2)  # one bf16 rounding of the fp32 sum
