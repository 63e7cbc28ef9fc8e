"""Mamba's selective scan as one Triton kernel: the state stays in registers while the loop walks through time.

Paper: Gu & Dao (2023), "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv:2312.00752 —
§3.3.2 (the hardware-aware scan: load the inputs once, keep the expanded state h in fast memory, write only y).
Implements, for every batch b, channel d and state index n (the recurrence of ``effref.alternatives.mamba``):

    h_t[d, n] = exp(Δ_t[d] · A[d, n]) · h_{t−1}[d, n] + Δ_t[d] · u_t[d] · B_t[n]
    y_t[d]    = Σ_n C_t[n] · h_t[d, n] + D[d] · u_t[d]

One program owns one batch row and BLOCK_D channels; its (BLOCK_D, N) state never leaves registers, so the
memory traffic is the inputs read once and y written once, instead of the (batch, T, D, N) tensors of Ā and B̄u
that an eager PyTorch version materialises (``selective_scan_parallel``) or the T small kernels per step that a
Python loop launches (``selective_scan_sequential``).
Glossary: u (batch, T, D) input · Δ ``delta`` (batch, T, D) step · A (D, N) · B, C (batch, T, N) · D (D,) skip ·
          h0 / h_last (batch, D, N) state · BLOCK_D channels per program · BLOCK_N = N rounded up to a power of 2.
Left out: the backward pass (the paper recomputes h in it instead of storing it); the fused in-projection, conv and
gating of the CUDA kernel; complex A; chunking T across programs (time is sequential inside one program, so
parallelism comes from batch × D / BLOCK_D programs).
"""

from __future__ import annotations

import torch

from effref import kernels
from effref.alternatives.mamba import selective_scan_parallel, selective_scan_sequential
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
def _selective_scan_kernel(
    u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, h0_ptr, y_ptr, h_last_ptr,
    T, D, N,
    HAS_H0: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    batch = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    d_ok, n_ok = d < D, n < N
    dn_ok = d_ok[:, None] & n_ok[None, :]  # (BLOCK_D, BLOCK_N)
    state_offsets = batch * D * N + d[:, None] * N + n[None, :]  # (BLOCK_D, BLOCK_N) into (batch, D, N)

    A = tl.load(a_ptr + d[:, None] * N + n[None, :], mask=dn_ok, other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_N)
    skip = tl.load(d_ptr + d, mask=d_ok, other=0.0).to(tl.float32)  # (BLOCK_D,)
    if HAS_H0:
        h = tl.load(h0_ptr + state_offsets, mask=dn_ok, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)

    for t in range(T):
        row = batch * T + t  # the (b, t) row of the (batch, T, ·) inputs
        # MEMORY-TRAFFIC: reads BLOCK_D values of u and Δ and N values of B and C per step; nothing else.
        u = tl.load(u_ptr + row * D + d, mask=d_ok, other=0.0).to(tl.float32)  # (BLOCK_D,)
        step = tl.load(delta_ptr + row * D + d, mask=d_ok, other=0.0).to(tl.float32)  # (BLOCK_D,)
        b = tl.load(b_ptr + row * N + n, mask=n_ok, other=0.0).to(tl.float32)  # (BLOCK_N,)
        c = tl.load(c_ptr + row * N + n, mask=n_ok, other=0.0).to(tl.float32)  # (BLOCK_N,)
        decay = tl.exp(step[:, None] * A)  # (BLOCK_D, BLOCK_N)   Ā_t = exp(Δ_t A)
        h = decay * h + (step * u)[:, None] * b[None, :]  # h_t = Ā_t h_{t−1} + Δ_t u_t B_t
        y = tl.sum(h * c[None, :], axis=1) + skip * u  # (BLOCK_D,)   y_t = C_t · h_t + D u_t
        tl.store(y_ptr + row * D + d, y.to(y_ptr.dtype.element_ty), mask=d_ok)
    tl.store(h_last_ptr + state_offsets, h, mask=dn_ok)


def _check(u, delta, A, B, C, D, h0) -> None:
    tensors = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}.dtype={t.dtype} is not supported; convert with .float() or .bfloat16()")
    if u.ndim != 3 or A.ndim != 2:
        raise ValueError(f"u must be (batch, T, D) and A (D, N), got shapes {tuple(u.shape)} and {tuple(A.shape)}")
    batch, T, width = u.shape
    N = A.shape[1]
    expected = {"delta": (batch, T, width), "A": (width, N), "B": (batch, T, N), "C": (batch, T, N), "D": (width,)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{name}.shape={tuple(tensors[name].shape)} does not fit u (batch, T, D)="
                             f"{tuple(u.shape)} and A (D, N)={tuple(A.shape)}; expected {shape}")
    if h0 is not None and tuple(h0.shape) != (batch, width, A.shape[1]):
        raise ValueError(f"h0.shape={tuple(h0.shape)} must be (batch, D, N)={(batch, width, N)}")
    check_device("u", u)
    check_same_device("u", u, **{k: v for k, v in tensors.items() if k != "u"},
                      **({"h0": h0} if h0 is not None else {}))


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y (batch, T, D) in u's dtype and the last state (batch, D, N) in fp32, as ``selective_scan_sequential``."""
    require_triton("selective_scan")
    _check(u, delta, A, B, C, D, h0)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C, D)):
        raise RuntimeError("selective_scan has no backward pass; call it under torch.no_grad(), or train with "
                           "effref.alternatives.selective_scan_parallel")
    batch, T, width = u.shape
    N = A.shape[1]
    y = torch.empty_like(u)  # (batch, T, D)
    h_last = torch.empty(batch, width, N, dtype=torch.float32, device=u.device)  # (batch, D, N)
    block_n = next_power_of_2(N)
    # the interpreter pays per program × step: one program per batch row; a GPU wants many small programs
    block_d = next_power_of_2(width) if kernels.INTERPRETED else max(1, min(64, 2048 // block_n))
    grid = (batch, triton.cdiv(width, block_d))
    _selective_scan_kernel[grid](
        u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(), D.contiguous(),
        h0.contiguous() if h0 is not None else h_last, y, h_last, T, width, N,
        HAS_H0=h0 is not None, BLOCK_D=block_d, BLOCK_N=block_n,
    )
    return y, h_last


def selective_scan_reference(u, delta, A, B, C, D, h0=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager loop of ``effref.alternatives.mamba`` in fp32, y cast back to u's dtype."""
    y, h = selective_scan_sequential(u.float(), delta.float(), A.float(), B.float(), C.float(), D.float(),
                                     None if h0 is None else h0.float())
    return y.to(u.dtype), h


def _y_kernel(*inputs):
    return selective_scan(*inputs)[0]


def _y_sequential(*inputs):
    return selective_scan_reference(*inputs)[0]


def _y_parallel(*inputs):
    return selective_scan_parallel(*inputs)[0]


def _make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple:
    batch, T, width, N = shape
    gen = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=gen, device=device)
    u = rand(batch, T, width).to(dtype)
    delta = torch.nn.functional.softplus(rand(batch, T, width) - 2).to(dtype)  # Δ > 0, as Mamba's softplus gives
    A = -torch.exp(rand(width, N) * 0.5).to(dtype)  # A < 0: a decaying state
    return u, delta, A, rand(batch, T, N).to(dtype), rand(batch, T, N).to(dtype), rand(width).to(dtype)


def scan_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    batch, T, width, N = shape
    size = torch.empty((), dtype=dtype).element_size()
    return size * (3 * batch * T * width + 2 * batch * T * N + width * N + width) + 4 * batch * width * N


def scan_flops(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    batch, T, width, N = shape
    return 6 * batch * T * width * N  # decay product, state update (2), output (2), exp counted as one


BENCHMARK = Benchmark(
    name="selective_scan",
    make_inputs=_make_inputs,
    kernel=_y_kernel,
    reference=_y_sequential,
    baselines={"eager loop": _y_sequential, "parallel scan": _y_parallel},
    bytes_moved=scan_bytes,
    flops=scan_flops,
    shape_names="(batch, T, D, N)",
    # Mamba-130M's inner width (2 × 768) and Mamba-2.8B's (2 × 2560), d_state 16
    shapes=[(1, 2048, 1536, 16), (8, 2048, 1536, 16), (1, 2048, 5120, 16)],
    check_shapes=[(2, 9, 24, 16), (1, 5, 7, 3)],
    dtypes=(torch.float32, torch.bfloat16),
    tolerance={torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2)},
)
