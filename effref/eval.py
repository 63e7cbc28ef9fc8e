"""The measuring instruments of the book: perplexity and generation speed (memory and size re-exported).

Every chapter reports its numbers through this module, so the protocols below are the ones the book cites.
Models may be transformers causal LMs (``model(ids).logits``) or our own ``effref.models.llama.Llama``
(``model(ids)`` is the logits tensor); ``forward_logits`` and ``greedy_generate`` hide the difference. Peak memory and
model size are measured by ``effref.memory`` (its docstring gives that protocol); its public names are
re-exported here, so ``from effref.eval import track_memory, model_size_bytes`` works as before.

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

Glossary: N stream length · W window · S stride · B batch · T prompt length · NLL negative log-likelihood
          · TTFT time to first token.
Left out: energy, multi-device runs, and sampled (non-greedy) decoding in the timings.
"""

from __future__ import annotations

import math
import numbers
import statistics
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from effref.memory import MemoryReport, bits_per_parameter, model_size_bytes, parameter_count, track_memory
from effref.models.calls import forward_logits, greedy_generate, model_device, synchronize
from effref.runtime import progress_bar

# MemoryReport, bits_per_parameter, model_size_bytes, parameter_count and track_memory live in effref.memory.
__all__ = ["GenerationResult", "MemoryReport", "PerplexityResult", "bits_per_parameter", "measure_generation",
           "model_size_bytes", "parameter_count", "perplexity", "track_memory"]


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
    device = model_device(model)
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
                logits = forward_logits(model, inputs)  # (b, W(+1), V)
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

    device = model_device(model)
    prompt = prompt_ids.long().to(device)  # (B, T)
    B, T = prompt.shape
    prefills, totals = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                greedy_generate(model, prompt, new_tokens)
            for _ in range(repeats):
                synchronize(device)
                t0 = time.perf_counter()
                forward_logits(model, prompt)  # the prefill alone: (B, T, V)
                synchronize(device)
                t1 = time.perf_counter()
                out = greedy_generate(model, prompt, new_tokens)  # (B, T + new_tokens)
                synchronize(device)
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
