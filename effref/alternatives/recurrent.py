"""What the alternatives to attention share: linear scans, long convolutions, a constant-size state, generation.

Mamba's selective scan and S4's recurrence are both the first-order linear recurrence

    h_t = a_t ⊙ h_{t−1} + b_t,          t = 0 … T−1,  h_{−1} = h0 (zeros when absent),

with a_t, b_t known for every t before the scan starts (they depend on the input, not on h). A loop computes it
in T dependent steps. Because (a, b) pairs compose associatively — applying (a₁, b₁) and then (a₂, b₂) is the
pair (a₂a₁, a₂b₁ + b₂) — it can also be computed in O(log T) rounds of whole-tensor operations (Blelloch 1990;
Martin & Cundy 2018 for linear RNNs; Gu & Dao 2023 §3.3.2 for Mamba). ``scan_parallel`` is the work-efficient
odd–even form: compose neighbouring pairs, scan the half-length sequence of composites, fill in the rest. It does
O(T) work like the loop, but in 2⌈log₂ T⌉ vectorised steps instead of T small ones, which is what training
wants; generation uses the loop with T = 1.

S4, DSS and Hyena use the other face of a linear time-invariant layer: a causal convolution y = K ∗ u of the whole
sequence with a kernel as long as the sequence, which ``causal_conv_fft`` computes in O(L log L) through the FFT and
``causal_conv_direct`` term by term in O(L²).

The models of this subpackage also share a protocol: ``model(ids, state)`` continues the sequence summarised by
``state`` (a small object of per-layer tensors whose size does not grow with the sequence, unlike a KV cache),
``model.new_state(batch_size)`` makes an empty one, and :class:`RecurrentLM` provides greedy or sampled
generation and exact save / load on top of that.

Glossary: a (decay, e.g. exp(Δ A) in Mamba) · b (input, e.g. Δ B x) · h state · T sequence length · t time step.
Left out: the hardware-aware fused kernel of Mamba (the expanded state lives in SRAM only, never in main memory)
and the in-place up-sweep / down-sweep formulation of the same scan.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from effref.checks import token_ids_or_raise

_META_KEY = "effref.alternatives"


def _check_scan_inputs(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> None:
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must have one shape (B, T, ...); "
                         "broadcast them before scanning")
    if h0 is not None and (h0.shape[0] != a.shape[0] or h0.shape[1:] != a.shape[2:]):
        raise ValueError(f"h0 {tuple(h0.shape)} must be a's shape without the time axis, "
                         f"{(a.shape[0], *a.shape[2:])}")


def scan_sequential(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """Every state h_t = a_t ⊙ h_{t−1} + b_t for a, b of shape (B, T, ...), by a loop over t: (B, T, ...)."""
    _check_scan_inputs(a, b, h0)
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0  # (B, ...)
    states = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]  # (B, ...)
        states.append(h)
    return torch.stack(states, dim=1)  # (B, T, ...)


def scan_parallel(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """The same states as :func:`scan_sequential` by the work-efficient odd–even scan: (B, T, ...).

    Compose each even/odd neighbour pair into one pair, scan the T/2 composites (recursively: that gives every
    odd state), then fill in every even state from the odd one before it. O(T) work, 2⌈log₂ T⌉ levels.
    """
    _check_scan_inputs(a, b, h0)
    if h0 is not None:  # fold the initial state into the first input: h_0 = a_0 h0 + b_0
        b = torch.cat([b[:, :1] + a[:, :1] * h0[:, None], b[:, 1:]], dim=1)
    return _odd_even_scan(a, b)


def _odd_even_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    T = a.shape[1]
    if T == 1:
        return b  # h_0 = b_0
    if T % 2:  # pad with the identity pair (a = 1, b = 0) to an even length
        a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        b = torch.cat([b, torch.zeros_like(b[:, :1])], dim=1)
    a_even, a_odd = a.unflatten(1, (-1, 2)).unbind(2)  # (B, ⌈T/2⌉, ...) each: a_{2k}, a_{2k+1}
    b_even, b_odd = b.unflatten(1, (-1, 2)).unbind(2)  # (unbind, not strided slices: a cheaper backward)
    # (a, b)_{2k} then (a, b)_{2k+1} is one pair (a_{2k+1} a_{2k}, a_{2k+1} b_{2k} + b_{2k+1}); scanning those
    # composites gives h_1, h_3, h_5, …
    h_odd = _odd_even_scan(a_odd * a_even, a_odd * b_even + b_odd)  # (B, ⌈T/2⌉, ...)
    h_before = torch.cat([torch.zeros_like(h_odd[:, :1]), h_odd[:, :-1]], dim=1)  # h_{2k−1} (h_{−1} = 0)
    h_even = a_even * h_before + b_even  # h_{2k} = a_{2k} h_{2k−1} + b_{2k}
    return torch.stack([h_even, h_odd], dim=2).flatten(1, 2)[:, :T]  # interleave: (B, T, ...)


def causal_conv_direct(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """y_t = Σ_{j ≤ t} k_j u_{t−j} over the last axis, term by term: O(L²). u (..., L), k broadcastable to it."""
    L = u.shape[-1]
    y = torch.zeros(torch.broadcast_shapes(u.shape, k.shape), dtype=torch.result_type(u, k), device=u.device)
    for j in range(L):  # the contribution of lag j to every position t ≥ j
        y[..., j:] += k[..., j:j + 1] * u[..., :L - j]
    return y  # (..., L)


def causal_conv_fft(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The same causal convolution through the FFT in O(L log L): both zero-padded to 2L, so that the circular
    convolution the FFT computes never wraps the end of the sequence onto its beginning. Real inputs."""
    L = u.shape[-1]
    spectrum = torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(k, n=2 * L)  # (..., L + 1)
    return torch.fft.irfft(spectrum, n=2 * L)[..., :L]  # (..., L)


class RecurrentLM(nn.Module):
    """A language model whose whole past is a constant-size state: ``model(ids, state)``, ``new_state``.

    Subclasses define ``cfg`` (a dataclass), ``forward(input_ids, state=None)`` returning logits (B, T, vocab)
    and updating ``state`` in place, and ``new_state(batch_size)``.
    """

    cfg: object
    config_type: type  # the config dataclass, so that ``load`` can rebuild the model from a file

    def num_parameters(self) -> int:
        """Number of distinct parameters (tied embeddings counted once)."""
        return sum(p.numel() for p in self.parameters())

    def check_ids(self, input_ids: torch.Tensor) -> None:
        """Refuse anything but integer token ids (B, T ≥ 1) inside the vocabulary, naming the fix."""
        token_ids_or_raise(input_ids, self.cfg.vocab_size)

    @torch.no_grad()
    def generate_stream(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                        top_k: int | None = None,
                        generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token of every sequence, (B,): one pass over the prompt, then one step per token,
        each step reading and updating only the fixed-size state. Greedy when ``temperature == 0``; else
        sampled from softmax(logits / temperature), restricted to the ``top_k`` most likely tokens if given."""
        if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"max_new_tokens={max_new_tokens}, temperature={temperature}, top_k={top_k}: "
                             "need max_new_tokens >= 0, temperature >= 0 and top_k >= 1 (or None)")
        self.check_ids(input_ids)
        state = self.new_state(input_ids.shape[0])
        logits = self(input_ids, state)[:, -1]  # (B, vocab)
        for step in range(max_new_tokens):
            if temperature == 0:
                token = logits.argmax(dim=-1)  # (B,)
            else:
                logits = logits.float() / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]  # (B,)
            yield token
            if step + 1 < max_new_tokens:
                logits = self(token[:, None], state)[:, -1]  # (B, vocab)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The prompt followed by ``max_new_tokens`` tokens, (B, T + new); see ``generate_stream``."""
        new = [t[:, None] for t in self.generate_stream(input_ids, max_new_tokens, temperature, top_k, generator)]
        return torch.cat([input_ids, *new], dim=1)  # (B, T + new)

    def save(self, path: str | Path) -> int:
        """Write the weights and the config to ``path`` (safetensors, bit for bit); return the file size."""
        path = Path(path)
        meta = {"class": type(self).__name__, "config": dataclasses.asdict(self.cfg)}
        save_model(self, str(path), metadata={_META_KEY: json.dumps(meta)})  # tied tensors stored once
        return path.stat().st_size

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> RecurrentLM:
        """The model ``save`` wrote to ``path``, rebuilt from its config, every tensor loaded (strict)."""
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "null"))
        if meta is None or meta.get("class") != cls.__name__:
            found = "no effref model" if meta is None else f"a {meta.get('class')}"
            raise ValueError(f"{path} holds {found}, not a {cls.__name__}; load it with the class that saved it")
        model = cls(cls.config_type(**meta["config"])).to(device)
        load_model(model, str(path), strict=True, device=str(device))  # tied tensors restored from one copy
        return model.eval()
