"""A seeded synthetic request trace: Poisson arrivals, prompt lengths and output lengths.

Papers: the evaluation setups of Kwon et al. (2023), arXiv:2309.06180 — §6.1 (Poisson request arrivals at a
given rate; ShareGPT/Alpaca length distributions), and Yu et al. (2022), Orca, OSDI '22 — §6.
Implements: inter-arrival gaps ~ Exponential(rate) (a Poisson process; ``rate=inf`` puts every request at
time 0, the offline "batch of requests" setting), prompt lengths ~ Uniform{lo..hi}, output lengths either
Uniform{lo..hi} or a long-tailed, clipped geometric law with the given mean (chat outputs are mostly short with
a few long ones, the shape that makes static batching wasteful).
Glossary: λ rate (requests per second) · t_i arrival time · p_i prompt length · o_i output length.
Left out: replaying real traces (ShareGPT, Alpaca): they are not available offline here.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class TraceRequest:
    request_id: int
    arrival: float  # seconds after the start of the trace
    prompt_len: int
    output_len: int


@dataclass
class TraceConfig:
    n_requests: int = 16
    rate: float = math.inf  # requests per second; inf: all at time 0
    prompt_len: tuple[int, int] = (16, 64)  # uniform, inclusive
    output_len: tuple[int, int] = (1, 64)  # clip range (inclusive)
    output_mean: float | None = 16.0  # geometric with this mean, clipped; None: uniform over output_len
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_requests < 1 or not self.rate > 0:
            raise ValueError(f"n_requests={self.n_requests} and rate={self.rate} must be positive")
        for name in ("prompt_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name}={getattr(self, name)} must be (lo, hi) with 1 <= lo <= hi")
        if self.output_mean is not None and not self.output_len[0] <= self.output_mean <= self.output_len[1]:
            raise ValueError(f"output_mean={self.output_mean} must lie inside output_len={self.output_len}")


def make_trace(cfg: TraceConfig) -> list[TraceRequest]:
    """``cfg.n_requests`` requests sorted by arrival; the same seed gives the same trace."""
    rng, t, trace = random.Random(cfg.seed), 0.0, []
    lo, hi = cfg.output_len
    for i in range(cfg.n_requests):
        if math.isfinite(cfg.rate) and i:
            t += rng.expovariate(cfg.rate)  # Poisson process: exponential gaps
        if cfg.output_mean is None:
            out = rng.randint(lo, hi)
        else:  # geometric on {lo, lo+1, ...} with mean output_mean, then clipped at hi
            p = 1.0 / (cfg.output_mean - lo + 1)
            out = lo + (int(math.log(1.0 - rng.random()) / math.log(1.0 - p)) if p < 1 else 0)
            out = min(out, hi)
        trace.append(TraceRequest(i, t, rng.randint(*cfg.prompt_len), out))
    return trace
