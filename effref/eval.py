"""The measuring instruments of the book: perplexity, generation speed, memory and model size.

Every chapter reports its numbers through this module, so the protocols below are the ones the book cites.
Models may be transformers causal LMs (``model(ids).logits``) or our own ``effref.models.llama.Llama``
(``model(ids)`` is the logits tensor); ``_logits`` and ``_generate`` hide the difference.

Perplexity protocol (``perplexity``)
------------------------------------
Let the token stream be ``x_0 … x_{N-1}``, the window ``W`` and the stride ``S`` (1 ≤ S ≤ W; default S = W).

1. Windows. Window ``k`` holds the ``W`` tokens ``x[k·S : k·S + W]``, for every ``k`` whose window fits in
   the stream. The tail after the last full window is dropped (at most ``S - 1`` tokens when S = W), unless
   the stream is shorter than one window: then the whole stream is the single window. ``max_windows = n``
   keeps the FIRST ``n`` windows, a fixed and deterministic subset.
2. Context. Each window is a separate forward pass that starts from an empty context (position 0). With
   ``bos_id``, the BOS token is put in front of every window as extra context: the model sees ``W + 1``
   tokens, the BOS itself is never a target, and the window still covers ``W`` tokens of the stream.
3. Scoring. A token is scored once, as the prediction from everything before it in its window:
   - window 0 scores every token but its first (which has nothing before it); with BOS it scores all ``W``;
   - every later window scores only its last ``S`` tokens; the ``W - S`` tokens before them are context
     that an earlier window already scored. With S = W (disjoint windows, the GPTQ / SparseGPT protocol)
     the first token of each window has no context, so each window scores ``W - 1`` tokens (``W`` with BOS).
     With S < W this is the Hugging Face sliding-window protocol: more context per prediction, more compute.
4. Result. ``ppl = exp(total NLL / scored tokens)``, with the per-token negative log-likelihoods (natural log)
   computed from float32 log-softmax and summed in float64.

Example: N = 4,100, W = 512, no BOS → 8 disjoint windows, 8 × 511 = 4,088 scored tokens, 4 tokens dropped.

Generation timing (``measure_generation``)
------------------------------------------
Greedy decoding of exactly ``new_tokens`` tokens for a (B, T) prompt; a transformers model gets
``min_new_tokens = new_tokens``, which also keeps it from emitting its EOS token (the usual "ignore EOS"
benchmark setting), while our Llama has no EOS unless asked for one. The time to first token (TTFT) is
measured as one forward pass over the prompt (the prefill), the total as one full ``generate`` call. The
first new token comes out of the prefill, so decoding produces the other ``new_tokens - 1`` per sequence in
``total - TTFT``: decode tokens/s = B·(new_tokens − 1)/(total − TTFT), and the per-token latency is
(total − TTFT)/(new_tokens − 1), the usual "time per output token". Overall tokens/s = B·new_tokens/total.
Timers are synchronised with the device (CUDA, MPS) and the median over ``repeats`` runs is reported.

Memory (``track_memory``)
-------------------------
On CUDA: the allocator's peak (``torch.cuda.max_memory_allocated``) during the block, absolute and relative
to the bytes allocated when the block started. On CPU and MPS no allocator peak exists, so a
``TorchDispatchMode`` watches every tensor an aten op returns inside the block, adds the bytes of each new
storage when it appears and subtracts them when the storage is freed, and keeps the maximum. This counts
tensor storages only: not allocator caching or fragmentation, not Python objects, not scratch memory a
single kernel allocates and frees internally, and not tensors created before the block (pass
``baseline_bytes``, e.g. ``model_size_bytes(model)``, to add those).

Glossary: N stream length · W window · S stride · B batch · T prompt length · NLL negative log-likelihood
          · TTFT time to first token.
Left out: energy, multi-device runs, and the allocator's reserved-but-unused memory.
"""

from __future__ import annotations

import math
import numbers
import statistics
import sys
import time
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from effref.runtime import progress_bar

# ----------------------------------------------------------------------------------------------------------
# Two model interfaces, one call


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model without tensors."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _is_hf(model: nn.Module) -> bool:
    """True for a transformers model that can generate (checked without importing transformers)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.GenerationMixin)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) for ids (B, T), whether the model returns a tensor or an object with ``.logits``."""
    out = model(ids, use_cache=False) if _is_hf(model) else model(ids)
    if isinstance(out, torch.Tensor):
        return out  # (B, T, V)
    if hasattr(out, "logits"):
        return out.logits  # (B, T, V)
    raise TypeError(f"model returned {type(out).__name__}; expected a logits tensor or an object with "
                    ".logits (a transformers causal LM or effref.models.llama.Llama)")


def _generate(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation of ids (B, T) by exactly ``new_tokens`` tokens: (B, T + new_tokens)."""
    if _is_hf(model):
        mask = torch.ones_like(ids)  # (B, T): no padding, said explicitly to silence the warning
        pad = model.generation_config.pad_token_id
        if pad is None:
            pad = model.generation_config.eos_token_id
        if isinstance(pad, list):
            pad = pad[0] if pad else None
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=pad if pad is not None else 0)
    else:
        out = model.generate(ids, new_tokens, temperature=0.0)
    if out.shape != (ids.shape[0], ids.shape[1] + new_tokens):
        raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected "
                           f"{(ids.shape[0], ids.shape[1] + new_tokens)}; did it stop early at an EOS token?")
    return out  # (B, T + new_tokens)


def _sync(device: torch.device) -> None:
    """Wait for queued device work, so that a timer reads the time the work really took."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ----------------------------------------------------------------------------------------------------------
# Perplexity


@dataclass(frozen=True)
class PerplexityResult:
    """One perplexity measurement and the protocol that produced it (see the module docstring)."""

    ppl: float
    nll_per_token: float  # nats
    scored_tokens: int
    windows: int
    window: int  # tokens of the stream per window (the stream length if it is shorter than one window)
    stride: int  # equal to window when the stream is a single short window
    bos: bool
    # Mean NLL of the tokens scored at each content position 0..window-1 of a window, averaged over windows
    # (NaN where nothing was scored, e.g. position 0 without BOS): how the loss depends on the context length.
    nll_by_position: torch.Tensor = field(repr=False, compare=False, default=None)

    def describe(self) -> str:
        noun = "window" if self.windows == 1 else "windows"
        return (f"{self.windows} × {self.window}-token {noun} ({self.scored_tokens:,} scored tokens), "
                f"stride {self.stride}, {'BOS' if self.bos else 'no BOS'}")


def perplexity(model: nn.Module, ids: torch.Tensor, window: int = 512, stride: int | None = None,
               max_windows: int | None = None, bos_id: int | None = None, batch_size: int = 1,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on the token stream ``ids`` (N,), by the windowed protocol of this module.

    ``stride`` defaults to ``window`` (disjoint windows); ``max_windows`` keeps the first n windows;
    ``bos_id`` prepends a BOS token to every window; ``batch_size`` windows go through the model at once
    (the result does not depend on it). The model is put in eval mode for the measurement and restored.
    """
    if not isinstance(ids, torch.Tensor) or ids.ndim != 1:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"ids must be a 1-D tensor of token ids, got {shape}; flatten with ids.reshape(-1)")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"ids must hold integer token ids, got dtype {ids.dtype}; use ids.long()")
    if window < 2:
        raise ValueError(f"window={window} is too small: a window needs at least 2 tokens; use e.g. 512")
    stride = window if stride is None else stride
    if not 1 <= stride <= window:
        raise ValueError(f"stride={stride} must be in [1, window={window}]; use stride=window for disjoint "
                         "windows or a smaller stride for sliding windows")
    if len(ids) < 2:
        raise ValueError(f"ids has {len(ids)} token(s); perplexity needs at least 2")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows={max_windows} must be >= 1, or None for every window")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    bad_bos = isinstance(bos_id, bool) or not isinstance(bos_id, numbers.Integral) or bos_id < 0
    if bos_id is not None and bad_bos:
        raise ValueError(f"bos_id={bos_id!r} must be a token id (int >= 0) such as tokenizer.bos_token_id, "
                         "or None")

    n_tokens = len(ids)
    if n_tokens < window:  # the only window is the (partial) stream itself
        window, stride, n_windows = n_tokens, n_tokens, 1
    else:
        n_windows = (n_tokens - window) // stride + 1  # full windows only; the tail is dropped
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)

    bos = bos_id is not None
    shift = int(bos)  # content token j sits at input position j + shift
    later_start = max(window - stride, 1 - shift)  # first scored content position in windows k >= 1
    device = _model_device(model)
    total_nll, scored = 0.0, 0
    position_nll = torch.zeros(window, dtype=torch.float64)  # (W,) summed over windows
    position_count = torch.zeros(window, dtype=torch.float64)  # (W,)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), progress_bar(total=n_windows, desc="perplexity", unit="window",
                                          disable=not progress) as bar:
            for first in range(0, n_windows, batch_size):
                ks = range(first, min(first + batch_size, n_windows))
                batch = torch.stack([ids[k * stride:k * stride + window] for k in ks]).to(device)  # (b, W)
                inputs = batch.long()  # (b, W)
                if bos:
                    inputs = F.pad(inputs, (1, 0), value=bos_id)  # (b, W + 1)
                logits = _logits(model, inputs)  # (b, W(+1), V)
                # The prediction for the token at input position i is the logit row i - 1.
                for row, k in enumerate(ks):
                    start = 1 - shift if k == 0 else later_start
                    pred = logits[row, start + shift - 1:window + shift - 1].float()  # (scored, V)
                    nll = F.cross_entropy(pred, inputs[row, start + shift:], reduction="none")  # (scored,)
                    total_nll += nll.double().sum().item()
                    scored += nll.numel()
                    position_nll[start:] += nll.double().cpu()
                    position_count[start:] += 1
                bar.update(len(ks))
    finally:
        model.train(was_training)

    nll_per_token = total_nll / scored
    ppl = math.exp(nll_per_token) if nll_per_token < 700 else math.inf
    return PerplexityResult(ppl=ppl, nll_per_token=nll_per_token, scored_tokens=scored, windows=n_windows,
                            window=window, stride=stride, bos=bos,
                            nll_by_position=position_nll / position_count)


# ----------------------------------------------------------------------------------------------------------
# Generation speed


@dataclass(frozen=True)
class GenerationResult:
    """Greedy generation timings (medians over the repeats); rates in tokens per second."""

    batch_size: int
    prompt_len: int
    new_tokens: int
    prefill_s: float  # time to first token: one forward over the prompt
    total_s: float  # one full generate call
    decode_s: float  # total_s - prefill_s
    decode_tokens_per_s: float  # B·(new_tokens - 1) / decode_s; nan (with a warning) if decode_s <= 0
    tokens_per_s: float  # B·new_tokens / total_s
    per_token_latency_s: float  # decode_s / (new_tokens - 1); nan if decode_s <= 0
    repeats: int
    device: str
    output_ids: torch.Tensor = field(repr=False, compare=False)  # (B, T + new_tokens), the last run

    def describe(self) -> str:
        return (f"batch {self.batch_size}, prompt {self.prompt_len} + {self.new_tokens} new tokens on "
                f"{self.device}: TTFT {self.prefill_s * 1e3:.1f} ms, decode {self.decode_tokens_per_s:.1f} "
                f"tok/s ({self.per_token_latency_s * 1e3:.1f} ms/token), overall {self.tokens_per_s:.1f} "
                f"tok/s (median of {self.repeats})")


def measure_generation(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int, warmup: int = 1,
                       repeats: int = 1) -> GenerationResult:
    """Time greedy generation of ``new_tokens`` tokens after ``prompt_ids`` (B, T); see the module docstring.

    ``warmup`` untimed generate calls come first (kernel selection, caches, lazy initialisation).
    """
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1:
        shape = tuple(prompt_ids.shape) if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids).__name__
        raise ValueError(f"prompt_ids must be a (B, T) tensor with T >= 1, got {shape}; use ids[None] for "
                         "one prompt")
    if prompt_ids.is_floating_point():
        raise ValueError(f"prompt_ids must hold integer token ids, got dtype {prompt_ids.dtype}; use .long()")
    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens} leaves no decode step to time; use new_tokens >= 2")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup={warmup}, repeats={repeats}: need warmup >= 0 and repeats >= 1")

    device = _model_device(model)
    prompt = prompt_ids.long().to(device)  # (B, T)
    B, T = prompt.shape
    prefills, totals = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                _generate(model, prompt, new_tokens)
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                _logits(model, prompt)  # the prefill alone: (B, T, V)
                _sync(device)
                t1 = time.perf_counter()
                out = _generate(model, prompt, new_tokens)  # (B, T + new_tokens)
                _sync(device)
                t2 = time.perf_counter()
                prefills.append(t1 - t0)
                totals.append(t2 - t1)
    finally:
        model.train(was_training)

    prefill, total = statistics.median(prefills), statistics.median(totals)
    decode = total - prefill
    if decode > 0:
        decode_rate, per_token = B * (new_tokens - 1) / decode, decode / (new_tokens - 1)
    else:  # the prefill alone took longer than a whole generate call: the timings are noise
        warnings.warn(f"prefill ({prefill:.4f} s) >= whole generation ({total:.4f} s): decode rates are "
                      "meaningless, reported as nan; use warmup >= 1, repeats >= 3 or more new_tokens",
                      RuntimeWarning, stacklevel=2)
        decode_rate = per_token = math.nan
    return GenerationResult(
        batch_size=B, prompt_len=T, new_tokens=new_tokens, prefill_s=prefill, total_s=total, decode_s=decode,
        decode_tokens_per_s=decode_rate, tokens_per_s=B * new_tokens / total, per_token_latency_s=per_token,
        repeats=repeats, device=str(device), output_ids=out)


# ----------------------------------------------------------------------------------------------------------
# Memory


@dataclass
class MemoryReport:
    """Filled in when the ``track_memory`` block exits: ``peak_bytes = start_bytes + peak_delta_bytes``."""

    device: str
    method: str = ""
    start_bytes: int = 0  # CUDA: allocated at entry; CPU/MPS: the baseline_bytes argument
    peak_delta_bytes: int = 0  # the most bytes alive at once among those allocated inside the block
    peak_bytes: int = 0

    def describe(self) -> str:
        return f"peak {self.peak_bytes:,} bytes ({self.peak_delta_bytes:,} inside the block; {self.method})"


class _LiveStorageBytes(TorchDispatchMode):
    """Count the bytes of storages created by aten ops while active; remember the maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: dict[int, weakref.finalize] = {}  # storage data_ptr -> its finalizer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        fresh = func is torch.ops.aten.lift_fresh.default  # torch.tensor(...) data enters here
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                # A view or an in-place result shares an input's storage: no new memory.
                if ptr == 0 or ptr in self._tracked or (ptr in inputs and not fresh):
                    continue
                self._add(storage, ptr)
        return out

    def _add(self, storage: torch.UntypedStorage, ptr: int) -> None:
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self._tracked[ptr] = weakref.finalize(storage, self._free, ptr, nbytes)

    def _free(self, ptr: int, nbytes: int) -> None:
        self.live -= nbytes
        self._tracked.pop(ptr, None)  # the allocator may hand the same address to the next storage

    def detach(self) -> None:
        for finalizer in list(self._tracked.values()):
            finalizer.detach()
        self._tracked.clear()


@contextmanager
def track_memory(device: torch.device | str, baseline_bytes: int = 0) -> Iterator[MemoryReport]:
    """Measure the peak memory of the block; the yielded ``MemoryReport`` is filled in on exit.

    CUDA uses the allocator's peak (``baseline_bytes`` is ignored: the bytes at entry are measured). CPU and
    MPS count tensor storages created inside the block and add ``baseline_bytes`` (see the module docstring).
    """
    device = torch.device(device)
    if baseline_bytes < 0:
        raise ValueError(f"baseline_bytes={baseline_bytes} must be >= 0 (e.g. model_size_bytes(model))")
    report = MemoryReport(device=str(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            yield report
        finally:
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            report.method = "torch.cuda.max_memory_allocated (allocator peak)"
            report.start_bytes, report.peak_delta_bytes, report.peak_bytes = start, peak - start, peak
        return
    counter = _LiveStorageBytes()
    try:
        with counter:
            yield report
    finally:
        counter.detach()
        report.method = "live tensor storages created in the block (TorchDispatchMode) + baseline"
        report.start_bytes, report.peak_delta_bytes = baseline_bytes, counter.peak
        report.peak_bytes = baseline_bytes + counter.peak


# ----------------------------------------------------------------------------------------------------------
# Size


def _distinct_tensors(module: nn.Module, buffers: bool) -> Iterator[torch.Tensor]:
    """Parameters (and buffers) of ``module``, each shared tensor object once."""
    yield from module.parameters()
    if buffers:
        yield from module.buffers()


def model_size_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers, each storage counted once (tied weights, views of one buffer).

    Quantized modules that keep codes, scales and zeros as buffers are counted with all their metadata.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    seen: set[tuple] = set()
    total = 0
    for t in _distinct_tensors(module, buffers=True):
        ptr = t.untyped_storage().data_ptr()
        key = (t.device, ptr) if ptr != 0 else ("tensor", id(t))  # meta / empty tensors have no address
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes() if ptr != 0 else t.numel() * t.element_size()
    return total


def parameter_count(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters; a tensor shared by several modules (tied weights) is counted once."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    seen: set[tuple] = set()
    total = 0
    for p in _distinct_tensors(module, buffers=False):
        if trainable_only and not p.requires_grad:
            continue
        ptr = p.data_ptr()
        key = (p.device, ptr, tuple(p.shape), p.stride()) if ptr != 0 else ("tensor", id(p))
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def bits_per_parameter(module: nn.Module, n_params: int | None = None) -> float:
    """Storage bits per parameter: 8·model_size_bytes / n_params.

    ``n_params`` defaults to ``parameter_count(module)``. For a quantized model whose weights became
    buffers, pass the parameter count of the original model, so 4-bit codes plus scales read as ~4.5.
    """
    if n_params is None:
        n_params = parameter_count(module)
        if n_params == 0:
            raise ValueError("module has no parameters (quantized weights kept as buffers?); pass n_params= "
                             "with the parameter count of the original model")
    if n_params <= 0:
        raise ValueError(f"n_params={n_params} must be > 0; pass the original model's parameter count")
    return 8 * model_size_bytes(module) / n_params
