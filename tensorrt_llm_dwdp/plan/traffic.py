"""Prompt lengths and what a context rank runs in one step.

``--isl`` takes one length (``8192``), a list drawn uniformly (``1024,8192,32768``),
``uniform:LO-HI`` or ``lognormal:MEDIAN,SIGMA`` (truncated at three sigma). ``--ratio R`` draws each prompt uniformly in
``[R*L, L]`` around the drawn length L (the random-range ratio of TensorRT-LLM's benchmarks, the
blog's "input ratio"). A rank's step takes whole prompts first-come first-served up to the token
budget ``max_num_tokens``; a prompt longer than the budget runs as chunks against its cached
prefix. Pure arithmetic on numpy arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Traffic:
    """A prompt-length distribution (tokens)."""

    kind: str                       # fixed | choice | uniform | lognormal
    values: tuple[float, ...]
    ratio: float = 1.0

    @property
    def max_len(self) -> int:
        """The longest prompt drawn (lognormal: truncated at three sigma)."""
        if self.kind == "lognormal":
            return int(self.values[0] * np.exp(3 * self.values[1]))
        return int(max(self.values))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` prompt lengths (int64, >= 1)."""
        if self.kind in ("fixed", "choice"):
            base = rng.choice(np.asarray(self.values), size=n)
        elif self.kind == "uniform":
            base = rng.uniform(self.values[0], self.values[1], size=n)
        else:
            base = np.minimum(rng.lognormal(np.log(self.values[0]), self.values[1], size=n),
                              self.max_len)
        if self.ratio < 1.0:
            base = base * rng.uniform(self.ratio, 1.0, size=n)
        return np.maximum(1, np.round(base)).astype(np.int64)

    def mean(self) -> float:
        return float(self.sample(4096, np.random.default_rng(0)).mean())


def parse_isl(text: str, ratio: float = 1.0) -> Traffic:
    """Parse ``--isl`` (see module docstring); raises ValueError naming the bad part."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"--ratio {ratio} must be in (0, 1]")
    try:
        if text.startswith("uniform:"):
            lo, hi = (float(x) for x in text[len("uniform:"):].split("-"))
            if not 1 <= lo <= hi:
                raise ValueError
            return Traffic("uniform", (lo, hi), ratio)
        if text.startswith("lognormal:"):
            median, sigma = (float(x) for x in text[len("lognormal:"):].split(","))
            if median < 1 or sigma <= 0:
                raise ValueError
            return Traffic("lognormal", (median, sigma), ratio)
        values = tuple(float(int(x)) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--isl {text!r}: expected LENGTH, L1,L2,..., uniform:LO-HI or "
                         f"lognormal:MEDIAN,SIGMA") from None
    if min(values) < 1:
        raise ValueError(f"--isl {text!r}: prompt lengths must be >= 1")
    return Traffic("fixed" if len(values) == 1 else "choice", values, ratio)


@dataclass(frozen=True)
class Chunk:
    """Part of one prompt run in a step: ``length`` new tokens after ``prefix`` cached ones."""

    request: int
    length: int
    prefix: int


def pack_steps(lengths: np.ndarray, budget: int) -> list[list[Chunk]]:
    """First-come first-served packing of prompts into steps of at most ``budget`` tokens.

    Returns the steps in order, each a list of chunks; a prompt longer than the remaining
    budget starts a new step, and one longer than ``budget`` runs as budget-sized chunks.
    """
    steps: list[list[Chunk]] = []
    cur: list[Chunk] = []
    used = 0
    for req, n in enumerate(int(x) for x in lengths):
        if used + n > budget and cur:
            steps.append(cur)
            cur, used = [], 0
        done = 0
        while n - done > budget:
            steps.append([Chunk(req, budget, done)])
            done += budget
        cur.append(Chunk(req, n - done, done))
        used += n - done
    if cur:
        steps.append(cur)
    return steps
