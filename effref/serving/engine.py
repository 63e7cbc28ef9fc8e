"""A small serving engine: our LLaMA + a paged KV cache + iteration-level scheduling, with streaming.

Papers: Kwon et al. (2023), "Efficient Memory Management for Large Language Model Serving with PagedAttention",
arXiv:2309.06180 (vLLM) — §4; Yu, Jeong, Kim, Kim, Chun (2022), "Orca: A Distributed Serving System for
Transformer-Based Generative Models", OSDI '22 — §4.
Implements: the loop schedule → copy swapped blocks out to / in from CPU memory and apply copy-on-write copies
→ one ragged forward over every scheduled sequence's new tokens (``paged_forward``) → pick each sequence's next
token → commit (finished sequences free their blocks at once). Preemption is by recomputation (default) or by
swapping (``preemption="swap"``, ``num_cpu_blocks``). ``generate`` returns each request's new tokens,
``stream`` yields (request index, token) as soon as a token exists, ``serve`` replays a timed trace on a clock
that advances by the measured wall time of each step (jumping over idle gaps) and records each request's
first-token and finish times. Greedy decoding, or sampling (temperature, top-k, top-p) from a per-request
random stream seeded by ``seed + request index``, so a request's output does not depend on which others share
its batch. ``n_samples`` > 1 forks a request after its prompt: the samples share the prompt's blocks and copy
the last, partly filled block on their first write (copy-on-write).
Speculative decoding (Leviathan et al. 2023, arXiv:2211.17192; Chen et al. 2023, arXiv:2302.01318; ``draft=``,
``gamma=``): each decoding sequence first gets up to γ draft tokens (never more than its remaining tokens − 1,
nor than free blocks allow) from ``PagedDraft``, which steps the draft model over all drafting sequences at
once on a paged cache of its own (``draft_blocks`` blocks; by default the target's pool plus room for γ tokens
per batch slot); their slots are reserved in the sequence's block table, and one ragged ``paged_forward``
verifies every sequence's γ+1 positions at once. Each sequence then applies the speculative-sampling rule
(``speculative_verify``: accept draft i with probability min(1, p_i(x_i)/q_i(x_i)), resample the first rejected
one from norm(max(0, p − q)), add a bonus token from p_γ+1 when all pass). At temperature 0, p and q are
one-hot and the output is token-for-token greedy decoding; at temperature T (top-k / top-p filtered alike in p
and q) each token is distributed as when sampling the target alone. ``commit`` caps the tokens at
``max_new_tokens`` / EOS and truncates the block table past them, returning whole unneeded blocks.
``speculation_stats`` counts accepted drafts.
Glossary: step = one model iteration (one target call) · clock = serving time in seconds · γ ``gamma`` · p, q
          target and draft next-token distributions at the drafted positions.
Left out: choosing γ per sequence from its acceptance rate, stop strings, logprobs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from collections.abc import Sequence as Seq

import torch

from effref.inference import speculative as spec
from effref.models.llama import Llama, not_llama_message
from effref.serving.blocks import BlockManager
from effref.serving.drafting import PagedDraft
from effref.serving.paged_cache import PagedKVCache, RaggedBatch, paged_forward
from effref.serving.scheduler import Scheduler, Sequence, Step


class Engine:
    """Continuous-batching generation for a ``Llama`` over a pool of ``num_blocks`` KV blocks."""

    def __init__(self, model: Llama, num_blocks: int = 256, block_size: int = 16, max_batch: int = 8,
                 max_step_tokens: int = 512, share_prefixes: bool = True, preemption: str = "recompute",
                 num_cpu_blocks: int = 0, draft: Llama | None = None, gamma: int = 4,
                 draft_blocks: int | None = None):
        if not isinstance(model, Llama):
            raise TypeError(not_llama_message(model, "model"))
        if draft is not None:
            if not isinstance(draft, Llama):
                raise TypeError(f"draft must be an effref.models.llama.Llama, got {type(draft).__name__}; "
                                "e.g. effref.inference.drafts.layer_skip_draft(model, 2)")
            spec.check_pair(model, draft)  # same vocabulary
            spec.SpeculativeConfig(gamma=gamma, temperature=0.0)  # validates gamma
        self.accepted: list[int] = []  # drafts accepted at each verification (one per sequence and step)
        self.drafted: list[int] = []  # drafts proposed at each verification
        self.model = model.eval()
        self.manager = BlockManager(num_blocks, block_size, share_prefixes)
        self.scheduler = Scheduler(self.manager, max_batch, max_step_tokens, model.cfg.max_seq_len, preemption,
                                   num_cpu_blocks)
        self.cache = PagedKVCache.for_model(model, num_blocks, block_size, num_cpu_blocks)
        # the draft's pool: the target's, plus γ tokens and one partly filled block for every batch slot
        if draft_blocks is None:
            draft_blocks = num_blocks + max_batch * (self.manager.blocks_needed(gamma) + 1)
        self.drafter = None if draft is None else PagedDraft(draft, draft_blocks, block_size)
        self.gamma = gamma
        self.steps, self._next_id = 0, 0
        self.sampling = spec.Sampling()  # greedy; set per ``stream`` call
        self._forks: dict[int, int] = {}  # request id -> extra samples still to fork

    def add_request(self, prompt: Seq[int] | torch.Tensor, max_new_tokens: int, arrival: float = 0.0,
                    eos_id: int | None = None, seed: int | None = None, n_samples: int = 1) -> Sequence:
        """Queue one request; it runs at the next ``step`` calls."""
        prompt = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
        if n_samples < 1:
            raise ValueError(f"n_samples={n_samples} must be >= 1")
        gen = None if seed is None else torch.Generator().manual_seed(seed)  # sampling draws on the CPU
        seq = Sequence(self._next_id, prompt, max_new_tokens, arrival, eos_id, gen)
        self.scheduler.add(seq)  # validates the lengths against the cache and the model
        self._next_id += 1
        if n_samples > 1:
            self._forks[seq.request_id] = n_samples - 1
        return seq

    def _fork(self, step: Step, logits: list[torch.Tensor], drafts: list[list[int]],
              draft_probs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Parallel sampling: a request that just processed its prompt gets children sharing its blocks."""
        for i, seq in enumerate(list(step.seqs)):
            for k in range(self._forks.pop(seq.request_id, 0) if not seq.output else 0):
                gen = None if seq.generator is None else torch.Generator().manual_seed(
                    seq.generator.initial_seed() + 1000 * (k + 1))
                child = Sequence(self._next_id, seq.prompt, seq.max_new_tokens, seq.arrival, seq.eos_id, gen,
                                 table=self.manager.fork(seq.table), status="running")
                self._next_id += 1
                step.seqs.append(child)
                step.starts.append(step.starts[i])
                logits.append(logits[i])
                drafts.append([])
                draft_probs.append(torch.zeros(0))
                self.scheduler.running.append(child)
        return logits

    def _propose(self, step: Step) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Draft tokens for every decoding sequence of the step, their slots reserved in its block table, and
        the draft distributions q (n_drafts, vocab) they were drawn from."""
        wanted = [min(self.gamma, seq.max_new_tokens - len(seq.output) - 1)  # never more than can be emitted
                  if self.drafter and seq.output and start == len(seq.tokens) - 1 else 0  # not a (re)prefill
                  for seq, start in zip(step.seqs, step.starts)]
        if not any(n > 0 for n in wanted):
            return [[] for _ in step.seqs], [torch.zeros(0) for _ in step.seqs]
        proposed, probs = self.drafter.propose(step.seqs, wanted, self.sampling)
        drafts = []
        for seq, tokens in zip(step.seqs, proposed):
            kept = []
            for token in tokens:
                if not self.manager.can_append(seq.table):  # no free block: verify fewer drafts
                    break
                copy = self.manager.append(seq.table, token)
                if copy is not None:
                    step.copies.append(copy)
                kept.append(token)
            drafts.append(kept)
        return drafts, [q[:len(kept)] for q, kept in zip(probs, drafts)]

    def _verify(self, step: Step, rows: list[torch.Tensor], drafts: list[list[int]],
                draft_probs: list[torch.Tensor]) -> list[list[int]]:
        """Each sequence's new tokens: its accepted drafts, then one token from the target (or the residual)."""
        new = []
        for seq, logits, drafted, q in zip(step.seqs, rows, drafts, draft_probs):  # logits (len(drafted)+1, V)
            if not drafted:
                new.append([self.sampling.draw(logits[-1], seq.generator)[0]])
                continue
            p = self.sampling.probs(logits)  # (len(drafted) + 1, vocab)
            n, token = spec.speculative_verify(p, q, torch.tensor(drafted), seq.generator)
            new.append(drafted[:n] + [token])
            self.accepted.append(n)
            self.drafted.append(len(drafted))
        return new

    @torch.no_grad()
    def step(self) -> list[tuple[Sequence, int]]:
        """One model iteration; returns the (sequence, new token) pairs it produced (with a draft, a sequence
        may produce several)."""
        step = self.scheduler.schedule()
        if not step.seqs:
            raise RuntimeError("the scheduler found nothing to run although requests are waiting; "
                               "this engine's block pool is too small for the next request")
        self.cache.swap(step.swap_out, step.swap_in)  # before anything writes into freed blocks
        drafts, draft_probs = self._propose(step)
        self.cache.copy_blocks(step.copies)
        batch = RaggedBatch.build([s.table for s in step.seqs], step.starts, self.cache.k.device)
        counts = [len(d) + 1 for d in drafts]  # logit rows per sequence: its last new token and its drafts
        ends = batch.last + 1  # (S,) one past each sequence's last new token
        wanted = torch.cat([torch.arange(int(e) - c, int(e)) for e, c in zip(ends, counts)]).to(ends.device)
        logits = paged_forward(self.model, self.cache, batch, wanted)  # (Σ counts, vocab)
        rows = self._fork(step, list(logits.split(counts)), drafts, draft_probs)
        before = [len(seq.output) for seq in step.seqs]
        self.scheduler.commit(step, self._verify(step, rows, drafts, draft_probs))
        self.steps += 1
        if self.drafter is not None:  # rejected drafts out of the draft's tables; finished/preempted ones freed
            self.drafter.sync(self.scheduler.running)
        return [(seq, token) for seq, n in zip(step.seqs, before) for token in seq.output[n:]]

    def speculation_stats(self) -> dict[str, float]:
        """Target steps and the drafts accepted per verification (one verification = one sequence, one step)."""
        n = max(len(self.accepted), 1)
        return {"target_steps": self.steps, "verifications": len(self.accepted),
                "accepted_per_verification": sum(self.accepted) / n,
                "tokens_per_verification": sum(self.accepted) / n + 1 if self.accepted else 0.0,
                "acceptance_rate": sum(self.accepted) / max(sum(self.drafted), 1)}

    def stream(self, prompts: Seq, max_new_tokens: int | Seq[int], temperature: float = 0.0,
               top_k: int | None = None, seed: int = 0, eos_id: int | None = None,
               n_samples: int = 1, top_p: float | None = None) -> Iterator[tuple[int, int]]:
        """Yield (request id, token) pairs as they are produced; request ids are 0.. in ``prompts`` order
        (forked samples get the ids after them). ``temperature`` 0 is greedy; otherwise tokens are sampled,
        after keeping the ``top_k`` most likely and then the ``top_p`` nucleus when they are given."""
        sampling = spec.Sampling(temperature, top_k, top_p)  # validates them
        if self.scheduler.has_work:
            raise RuntimeError("the engine is still serving other requests; finish them before a new call")
        lengths = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(lengths) != len(prompts):
            raise ValueError(f"max_new_tokens has {len(lengths)} entries for {len(prompts)} prompts")
        self.sampling, self._next_id = sampling, 0
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
        self.sampling, self._next_id = spec.Sampling(), 0
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
            for seq in {id(seq): seq for seq, _ in produced}.values():  # a sequence may produce several
                if seq.first_token_time is None:
                    seq.first_token_time = clock
                if seq.status == "finished":
                    seq.finish_time = clock
                    if progress is not None:
                        progress.update(1)
        return done
