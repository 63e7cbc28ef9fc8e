"""RWKV-4's WKV operator as one Triton kernel: the numerically stable recurrence, its state kept in registers.

Paper: Peng et al. (2023), "RWKV: Reinventing RNNs for the Transformer Era", arXiv:2305.13048 — §3 (the WKV
operator) and its CUDA kernel's idea: one thread per (sequence, channel) walks through time.
Implements, per batch row and channel c, the recurrence of ``effref.alternatives.rwkv.wkv_recurrent``:

    q = max(p, u + k_t)
    wkv_t = (e^{p−q} a + e^{u+k_t−q} v_t) / (e^{p−q} b + e^{u+k_t−q})
    p' = max(p − w, k_t),   a' = e^{p−w−p'} a + e^{k_t−p'} v_t,   b' = e^{p−w−p'} b + e^{k_t−p'}

(a, b) are the numerator and denominator of the decaying weighted average and p their common scale, the running
maximum exponent that keeps every e^{·} ≤ 1. One program owns one batch row and BLOCK_C channels; k and v are
read once and wkv written once, where the eager loop launches about fifteen small kernels per token and the
parallel form materialises a (T, T, C) tensor per sequence.
Glossary: w (C,) decay rate e^{time_decay} · u (C,) time_first bonus · k, v (batch, T, C) · (a, b, p) state,
          each (batch, C), fp32 · BLOCK_C channels per program.
Left out: the backward pass (RWKV's CUDA kernel has one); chunking T across programs.
"""

from __future__ import annotations

import torch

from effref import kernels
from effref.alternatives.rwkv import empty_wkv_state, wkv_parallel, wkv_recurrent
from effref.kernels._runtime import (
    Benchmark,
    check_device,
    check_same_device,
    next_power_of_2,
    require_triton,
    tl,
    triton,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _wkv_kernel(w_ptr, u_ptr, k_ptr, v_ptr, a_ptr, b_ptr, p_ptr, out_ptr, T, C, BLOCK_C: tl.constexpr):
    batch = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    ok = c < C
    w = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)  # (BLOCK_C,)
    u = tl.load(u_ptr + c, mask=ok, other=0.0).to(tl.float32)
    state = batch * C + c  # offsets into the (batch, C) state, read at the start and overwritten at the end
    a = tl.load(a_ptr + state, mask=ok, other=0.0)  # (BLOCK_C,) fp32
    b = tl.load(b_ptr + state, mask=ok, other=0.0)
    p = tl.load(p_ptr + state, mask=ok, other=0.0)
    for t in range(T):
        offsets = (batch * T + t) * C + c  # the (b, t) row of (batch, T, C)
        # MEMORY-TRAFFIC: reads BLOCK_C values of k and v per step, writes BLOCK_C values of wkv.
        k = tl.load(k_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        q = tl.maximum(p, u + k)  # the output's scale
        e_past, e_now = tl.exp(p - q), tl.exp(u + k - q)
        tl.store(out_ptr + offsets, (e_past * a + e_now * v) / (e_past * b + e_now), mask=ok)
        p_next = tl.maximum(p - w, k)  # decay the past by e^{−w}, add token t
        e_past, e_now = tl.exp(p - w - p_next), tl.exp(k - p_next)
        a = e_past * a + e_now * v
        b = e_past * b + e_now
        p = p_next
    tl.store(a_ptr + state, a, mask=ok)
    tl.store(b_ptr + state, b, mask=ok)
    tl.store(p_ptr + state, p, mask=ok)


def wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """wkv (batch, T, C) in fp32 and the state after the last token, as ``wkv_recurrent``; the input state is
    not modified."""
    require_triton("wkv")
    for name, t in (("w", w), ("u", u), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be a float32/float16/bfloat16 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if k.ndim != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must both be (batch, T, C), got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, T, C = k.shape
    if w.shape != (C,) or u.shape != (C,):
        raise ValueError(f"w and u must be ({C},) — one value per channel of k — got {tuple(w.shape)} and "
                         f"{tuple(u.shape)}")
    if state is not None and any(s.shape != (batch, C) for s in state):
        raise ValueError(f"state must be three (batch, C)=({batch}, {C}) tensors (a, b, p), as wkv returns")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (w, u, k, v)):
        raise RuntimeError("wkv has no backward pass; call it under torch.no_grad(), or train with "
                           "effref.alternatives.wkv_parallel")
    check_device("k", k)
    check_same_device("k", k, w=w, u=u, v=v)
    a, b, p = (s.float().clone() for s in (state if state is not None else empty_wkv_state(k)))  # (batch, C)
    out = torch.empty(batch, T, C, dtype=torch.float32, device=k.device)  # (batch, T, C)
    block_c = next_power_of_2(C) if kernels.INTERPRETED else min(256, next_power_of_2(C))
    _wkv_kernel[(batch, triton.cdiv(C, block_c))](w.contiguous(), u.contiguous(), k.contiguous(), v.contiguous(),
                                                  a, b, p, out, T, C, BLOCK_C=block_c)
    return out, (a, b, p)


def _out_kernel(*inputs):
    return wkv(*inputs)[0]


def _out_recurrent(*inputs):
    return wkv_recurrent(*inputs)[0]


def _out_parallel(*inputs):
    return wkv_parallel(*inputs)[0]


def _make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple:
    batch, T, C = shape
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.exp(torch.randn(C, generator=gen, device=device) - 1)  # decay rates > 0
    u = torch.randn(C, generator=gen, device=device)
    k = 3 * torch.randn(batch, T, C, generator=gen, device=device)  # large keys: the running maximum matters
    v = torch.randn(batch, T, C, generator=gen, device=device)
    return w, u, k.to(dtype), v.to(dtype)


def wkv_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    batch, T, C = shape
    return 2 * batch * T * C * torch.empty((), dtype=dtype).element_size() + 4 * batch * T * C + 8 * C


def wkv_flops(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    batch, T, C = shape
    return 20 * batch * T * C  # four exponentials and about sixteen adds, multiplies, maxima and one division


BENCHMARK = Benchmark(
    name="wkv",
    make_inputs=_make_inputs,
    kernel=_out_kernel,
    reference=_out_recurrent,
    baselines={"eager loop": _out_recurrent, "parallel form": _out_parallel},
    bytes_moved=wkv_bytes,
    flops=wkv_flops,
    shape_names="(batch, T, C)",
    # RWKV-4 169M (C = 768) and 3B (C = 2560) at their 1024-token training context
    shapes=[(1, 1024, 768), (8, 1024, 768), (8, 1024, 2560)],
    check_shapes=[(2, 17, 32), (1, 4, 5)],
    dtypes=(torch.float32, torch.bfloat16),
    tolerance={torch.float32: (1e-4, 1e-4), torch.bfloat16: (1e-4, 1e-4)},  # fp32 output from the same inputs
)
