"""A small serving engine: our LLaMA + a paged KV cache + iteration-level scheduling, with streaming.

Papers: Kwon et al. (2023), "Efficient Memory Management for Large Language Model Serving with PagedAttention",
arXiv:2309.06180 (vLLM) — §4; Yu, Jeong, Kim, Kim, Chun (2022), "Orca: A Distributed Serving System for
Transformer-Based Generative Models", OSDI '22 — §4.
Implements: the loop  schedule → copy swapped blocks out to / in from CPU memory and apply copy-on-write
copies → one ragged forward over every scheduled sequence's new tokens (``paged_forward``) → pick each
sequence's next token → commit (finished sequences free their blocks at once). Preemption is by
recomputation (default) or by swapping (``preemption="swap"``, ``num_cpu_blocks``). ``generate`` returns each request's new tokens, ``stream`` yields
(request index, token) as soon as a token exists, ``serve`` replays a timed trace on a clock that advances
by the measured wall time of each step (and jumps over idle gaps instead of sleeping) and records
each request's first-token and finish times. Greedy decoding, or sampling (temperature, top-k) from a
per-request random stream seeded by ``seed + request index``, so a request's output does not depend on which
others share its batch. ``n_samples`` > 1 forks a request after its prompt is processed: the samples share
the prompt's blocks and copy the last, partly filled block on their first write (copy-on-write).
Glossary: step = one model iteration · clock = serving time in seconds.
Left out: speculative decoding inside the engine (effref.inference has the algorithms for one sequence; a
          ragged draft-and-verify step needs per-sequence rollback of block tables), stop strings, logprobs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from collections.abc import Sequence as Seq

import torch

from effref.models.llama import Llama
from effref.serving.blocks import BlockManager
from effref.serving.paged_cache import PagedKVCache, RaggedBatch, paged_forward
from effref.serving.scheduler import Scheduler, Sequence, Step


class Engine:
    """Continuous-batching generation for a ``Llama`` over a pool of ``num_blocks`` KV blocks."""

    def __init__(self, model: Llama, num_blocks: int = 256, block_size: int = 16, max_batch: int = 8,
                 max_step_tokens: int = 512, share_prefixes: bool = True, preemption: str = "recompute",
                 num_cpu_blocks: int = 0):
        if not isinstance(model, Llama):
            raise TypeError(f"model must be an effref.models.llama.Llama, got {type(model).__name__}; "
                            "convert a transformers model with Llama.from_hf")
        self.model = model.eval()
        self.manager = BlockManager(num_blocks, block_size, share_prefixes)
        self.scheduler = Scheduler(self.manager, max_batch, max_step_tokens, model.cfg.max_seq_len, preemption,
                                   num_cpu_blocks)
        self.cache = PagedKVCache.for_model(model, num_blocks, block_size, num_cpu_blocks)
        self.steps, self._next_id = 0, 0
        self.temperature, self.top_k = 0.0, None  # set per ``stream`` call
        self._forks: dict[int, int] = {}  # request id -> extra samples still to fork

    def add_request(self, prompt: Seq[int] | torch.Tensor, max_new_tokens: int, arrival: float = 0.0,
                    eos_id: int | None = None, seed: int | None = None, n_samples: int = 1) -> Sequence:
        """Queue one request; it runs at the next ``step`` calls."""
        prompt = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
        if n_samples < 1:
            raise ValueError(f"n_samples={n_samples} must be >= 1")
        gen = None if seed is None else torch.Generator(device=self.cache.k.device).manual_seed(seed)
        seq = Sequence(self._next_id, prompt, max_new_tokens, arrival, eos_id, gen)
        self.scheduler.add(seq)  # validates the lengths against the cache and the model
        self._next_id += 1
        if n_samples > 1:
            self._forks[seq.request_id] = n_samples - 1
        return seq

    def _pick(self, logits: torch.Tensor, seq: Sequence) -> int:
        if self.temperature == 0:
            return int(logits.argmax())
        logits = logits.float() / self.temperature  # (vocab,)
        if self.top_k is not None:
            kth = logits.topk(min(self.top_k, len(logits))).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return int(torch.multinomial(logits.softmax(-1), 1, generator=seq.generator))

    def _fork(self, step: Step, logits: torch.Tensor) -> torch.Tensor:
        """Parallel sampling: a request that just processed its prompt gets children sharing its blocks."""
        for i, seq in enumerate(list(step.seqs)):
            for k in range(self._forks.pop(seq.request_id, 0) if not seq.output else 0):
                gen = None if seq.generator is None else torch.Generator(seq.generator.device).manual_seed(
                    seq.generator.initial_seed() + 1000 * (k + 1))
                child = Sequence(self._next_id, seq.prompt, seq.max_new_tokens, seq.arrival, seq.eos_id, gen,
                                 table=self.manager.fork(seq.table), status="running")
                self._next_id += 1
                step.seqs.append(child)
                step.starts.append(step.starts[i])
                logits = torch.cat([logits, logits[i:i + 1]])
                self.scheduler.running.append(child)
        return logits

    @torch.no_grad()
    def step(self) -> list[tuple[Sequence, int]]:
        """One model iteration; returns the (sequence, new token) pairs it produced."""
        step = self.scheduler.schedule()
        if not step.seqs:
            raise RuntimeError("the scheduler found nothing to run although requests are waiting; "
                               "this engine's block pool is too small for the next request")
        self.cache.swap(step.swap_out, step.swap_in)  # before anything writes into freed blocks
        self.cache.copy_blocks(step.copies)
        batch = RaggedBatch.build([s.table for s in step.seqs], step.starts, self.cache.k.device)
        logits = paged_forward(self.model, self.cache, batch)  # (S, vocab)
        logits = self._fork(step, logits)
        tokens = [self._pick(row, seq) for row, seq in zip(logits, step.seqs)]
        self.scheduler.commit(step, tokens)
        self.steps += 1
        return list(zip(step.seqs, tokens))

    def stream(self, prompts: Seq, max_new_tokens: int | Seq[int], temperature: float = 0.0,
               top_k: int | None = None, seed: int = 0, eos_id: int | None = None,
               n_samples: int = 1) -> Iterator[tuple[int, int]]:
        """Yield (request id, token) pairs as they are produced; request ids are 0.. in ``prompts`` order
        (forked samples get the ids after them)."""
        if temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"temperature={temperature}, top_k={top_k}: need temperature >= 0, top_k >= 1")
        if self.scheduler.has_work:
            raise RuntimeError("the engine is still serving other requests; finish them before a new call")
        lengths = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(lengths) != len(prompts):
            raise ValueError(f"max_new_tokens has {len(lengths)} entries for {len(prompts)} prompts")
        self.temperature, self.top_k, self._next_id = temperature, top_k, 0
        try:
            for i, (prompt, n) in enumerate(zip(prompts, lengths)):
                self.add_request(prompt, n, eos_id=eos_id, seed=seed + i if temperature > 0 else None,
                                 n_samples=n_samples)
        except ValueError:  # one bad request: queue none of them
            self.scheduler.waiting.clear()
            self._forks.clear()
            raise
        while self.scheduler.has_work:
            for seq, token in self.step():
                yield seq.request_id, token

    def generate(self, prompts: Seq, max_new_tokens: int | Seq[int], **kwargs) -> list[list[int]]:
        """The new tokens of every request (and of forked samples after them), in request-id order."""
        out: dict[int, list[int]] = {}
        for rid, token in self.stream(prompts, max_new_tokens, **kwargs):
            out.setdefault(rid, []).append(token)
        return [out[i] for i in sorted(out)]

    def serve(self, requests: Seq[tuple[float, Seq[int], int]], progress=None) -> list[Sequence]:
        """Replay (arrival seconds, prompt, new tokens) requests; greedy. Returns the finished sequences
        with ``first_token_time`` and ``finish_time`` on the serving clock."""
        if self.scheduler.has_work:
            raise RuntimeError("the engine is still serving other requests; finish them before a new call")
        self.temperature, self.top_k, self._next_id = 0.0, None, 0
        pending = sorted(requests, key=lambda r: r[0])
        clock, done, i = 0.0, [], 0
        while i < len(pending) or self.scheduler.has_work:
            while i < len(pending) and pending[i][0] <= clock:
                done.append(self.add_request(pending[i][1], pending[i][2], arrival=pending[i][0]))
                i += 1
            if not self.scheduler.has_work:
                clock = pending[i][0]  # idle: jump to the next arrival
                continue
            start = time.perf_counter()
            produced = self.step()
            clock += time.perf_counter() - start
            for seq, _ in produced:
                if seq.first_token_time is None:
                    seq.first_token_time = clock
                if seq.status == "finished":
                    seq.finish_time = clock
                    if progress is not None:
                        progress.update(1)
        return done
