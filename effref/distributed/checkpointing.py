"""Activation checkpointing: keep a block's inputs, not its intermediate activations, and recompute in backward.

Paper: Chen, Xu, Zhang, Guestrin (2016), "Training Deep Nets with Sublinear Memory Cost", arXiv:1604.06174 —
§3–4 (drop the activations inside a segment, recompute them from the segment's input during backward).
Implements: for a segment f (a transformer block) with input x, forward runs y = f(x) without recording the
graph and keeps only x; backward re-runs y = f(x) with the graph, then back-propagates the incoming ∂L/∂y through
it, so the parameters of f and x receive exactly the gradients of the plain run. The random-number state is
restored before the re-run, so dropout draws the same masks. Memory: for n blocks each saving A bytes of
activations, the plain run keeps n·A, the checkpointed one n·|x| plus one block's A during its backward; the
price is one more forward per block (about a third more compute).
Glossary: segment ``function`` · x ``inputs``.
Left out: the paper's √n segment planning and its memory planner, non-tensor arguments, keyword arguments,
nested checkpoints, and the non-reentrant variant of ``torch.utils.checkpoint``; like torch's reentrant variant,
at least one input must require a gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function, *inputs):
        ctx.function = function
        ctx.rng_state = torch.get_rng_state()
        ctx.cuda_rng_state = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        ctx.save_for_backward(*inputs)  # the only activations kept
        with torch.no_grad():
            return function(*inputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        inputs = [x.detach().requires_grad_(x.requires_grad) for x in ctx.saved_tensors]
        devices = list(range(torch.cuda.device_count())) if ctx.cuda_rng_state is not None else []
        with torch.random.fork_rng(devices=devices):  # the re-run sees the forward's random state
            torch.set_rng_state(ctx.rng_state)
            if ctx.cuda_rng_state is not None:
                torch.cuda.set_rng_state_all(ctx.cuda_rng_state)
            with torch.enable_grad():
                outputs = ctx.function(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(y, g) for y, g in zip(outputs, grad_outputs) if y.requires_grad and g is not None]
        torch.autograd.backward([y for y, _ in pairs], [g for _, g in pairs])  # parameters' grads accumulate here
        return (None, *[x.grad if x.requires_grad else None for x in inputs])


def checkpoint(function: Callable[..., torch.Tensor], *inputs: torch.Tensor):
    """``function(*inputs)``, keeping only ``inputs`` for backward and recomputing the rest."""
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError("checkpoint takes tensor inputs only (pass other settings through a closure or partial)")
    if torch.is_grad_enabled() and not any(x.requires_grad for x in inputs):
        raise ValueError("no input requires a gradient, so the checkpointed block would get none; checkpoint a "
                         "block whose input comes from a trainable layer (e.g. after the embedding)")
    return _Checkpoint.apply(function, *inputs)


def checkpoint_modules(modules: list[nn.Module]) -> None:
    """Make each module's forward a checkpointed one (in place; module hooks still run around it)."""
    for module in modules:
        if getattr(module, "_effref_checkpointed", False):
            raise ValueError(f"{type(module).__name__} is already checkpointed")
        plain_forward = module.forward
        module.forward = lambda *inputs, f=plain_forward: (checkpoint(f, *inputs) if torch.is_grad_enabled()
                                                           else f(*inputs))
        module._effref_checkpointed = True


def saved_activation_bytes(run: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd keeps for backward while ``run()`` builds its graph (parameters not counted)."""
    saved: dict[int, int] = {}

    def pack(tensor):
        if not isinstance(tensor, nn.Parameter):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run()
    del output
    return sum(saved.values())
