"""Per-request sampling of a step's next tokens: greedy, temperature, top-k, top-p, min-p, seed.

One ``Sampler.sample`` call turns a step's logits ``[n, V]`` into n tokens. Greedy rows
(temperature 0) take ``argmax`` of their logits, which are never modified. Sampled rows are
handled together on the logits' device with their parameters as ``[S]`` tensors:

    x     = logits[rows].float() / temperature            # [S, V]
    keep  = top_k(x) & top_p(softmax(x)) & min_p(...)      # masks in sorted order, scattered back
    token = argmax(where(keep, x, -inf) + gumbel)          # Gumbel-max: a draw from softmax(x | keep)

Filters apply in the order temperature -> top-k -> top-p (on the distribution renormalised over
the top-k) -> min-p (relative to the most likely token), as vLLM and TensorRT-LLM do.

Reproducibility: the Gumbel noise of a row comes from a counter-based generator keyed by
``step_seed(seed, t)``, t being the index of the token in the request's output (0 for the token
prefill produces): element v of the row is SplitMix64's v-th output for that key, computed for
all rows in one batch of elementwise ops (no per-row launch, no generator state). The noise,
and every operation after it, is a function of that row alone,
so a seed gives the same text whatever else shares the step, and a disaggregated request
(first token on the context server, the rest on a generation server) draws exactly what an
aggregated one does. Requests without a seed get a random one when they arrive
(``resolve_seed``).
"""
from __future__ import annotations

import secrets
from dataclasses import replace
from typing import Sequence

import torch

from tensorrt_llm_dwdp.engine.scheduler import SamplingParams

_MASK64 = (1 << 64) - 1


def resolve_seed(params: SamplingParams) -> SamplingParams:
    """``params`` with a seed: the request's own, or a random one for an unseeded sampled request
    (kept for the request's lifetime so its draws stay independent of other requests)."""
    if params.greedy or params.seed is not None:
        return params
    return replace(params, seed=secrets.randbits(63))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, t: int) -> int:
    """The generator seed of output token ``t`` of a request seeded with ``seed`` (any int)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ t)


def _signed(c: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GAMMA = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (``>>`` on int64 is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def counter_uniform(keys: torch.Tensor, n: int) -> torch.Tensor:
    """``[len(keys), n]`` float32 uniforms in (0, 1): element v of row i is SplitMix64's
    (v + 1)-th output from state ``keys[i]`` (int64 bits), top 23 bits, centred in its bin
    (23 bits + the half fit float32's 24-bit significand exactly).

    Integer products wrap modulo 2**64 in torch's int64 kernels on CPU and CUDA, which is the
    uint64 arithmetic SplitMix64 is defined with (tested against the scalar ``_splitmix64``).
    """
    counter = torch.arange(1, n + 1, dtype=torch.int64, device=keys.device)
    x = keys[:, None] + counter[None, :] * _GAMMA
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    return (_shr(x, 41).float() + 0.5) * 2.0 ** -23


class Sampler:
    """Chooses the next token of every row of a step; one per engine (stateless otherwise)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               positions: Sequence[int]) -> list[int]:
        """``logits`` ``[n, V]`` (not modified); ``params[i]`` / ``positions[i]`` (output index
        of the token being chosen) of row i. Sampled rows need a seed (``resolve_seed``)."""
        n = logits.shape[0]
        if len(params) != n or len(positions) != n:
            raise ValueError(f"{n} logits rows but {len(params)} params and {len(positions)} positions")
        rows = [i for i, p in enumerate(params) if not p.greedy]
        tokens = logits.argmax(dim=-1)
        if rows:
            chosen = self._sample_rows(logits, rows, [params[i] for i in rows],
                                       [positions[i] for i in rows])
            tokens = tokens.index_copy(0, torch.tensor(rows, device=tokens.device), chosen)
        return tokens.tolist()

    def _sample_rows(self, logits: torch.Tensor, rows: list[int], params: list[SamplingParams],
                     positions: list[int]) -> torch.Tensor:
        device = logits.device
        x = logits.index_select(0, torch.tensor(rows, device=device)).float()
        settings = torch.tensor([[p.temperature, p.top_p, p.top_k, p.min_p] for p in params],
                                dtype=torch.float32).to(device)
        temperature, top_p, top_k, min_p = settings.unbind(dim=1)
        x.div_(temperature[:, None])
        if any(p.top_k or p.top_p < 1 or p.min_p > 0 for p in params):
            x = _filter(x, top_k, top_p, min_p)
        return (x + self._gumbel(x.shape, params, positions)).argmax(dim=-1)

    def _gumbel(self, shape: torch.Size, params: list[SamplingParams],
                positions: list[int]) -> torch.Tensor:
        """Gumbel(0, 1) noise ``[S, V]``; row i keyed by (seed_i, t_i), all rows in one pass."""
        if any(p.seed is None for p in params):
            raise ValueError("a sampled request needs a seed: pass its params through resolve_seed")
        keys = torch.tensor([_signed(step_seed(p.seed, t)) for p, t in zip(params, positions)],
                            dtype=torch.int64).to(self.device)
        # u in (0, 1) strictly: -log(-log(u)) is finite, so a kept token always beats a masked one.
        return counter_uniform(keys, shape[1]).log_().neg_().log_().neg_()


def _filter(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
            min_p: torch.Tensor) -> torch.Tensor:
    """``x`` ``[S, V]`` with the tokens each row's top-k / top-p / min-p removes set to -inf.

    Works in descending order (a stable sort, so ties resolve the same way for any batch):
    rank >= k goes; top-p keeps the shortest prefix whose probability reaches p (the first token
    always stays); min-p drops tokens below ``min_p`` times the top token's probability.
    """
    values, order = x.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(x.shape[1], device=x.device)[None, :]
    remove = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    values = values.masked_fill(remove, float("-inf"))
    probs = values.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above
    remove |= (top_p[:, None] < 1) & (before >= top_p[:, None])  # p = 1: rounding must not cut the tail
    remove |= probs < min_p[:, None] * probs[:, :1]
    remove[:, 0] = False
    kept = values.masked_fill(remove, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, kept)
