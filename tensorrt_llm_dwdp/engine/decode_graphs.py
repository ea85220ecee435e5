"""CUDA graphs of the engine's decode steps: one per (batch-size bucket, context bucket).

An eager decode step pays the host's time for every launch of every layer (hundreds per layer),
which sets the pace of small batches whatever the GPU does. Replaying a captured graph costs a
few launches per step. The graph of bucket ``(b, L)`` runs ``b`` sequences that attend to at
most ``L`` cached positions:

- a step of ``B <= b`` sequences is padded to ``b`` rows: row ``i >= B`` is token 0 at
  position 0 of the cache's scratch slot (one slot past the engine's, written by padding rows
  only) with one valid key; its logits are dropped;
- ``L`` is the smallest power of two >= the step's longest context (at least ``MIN_CONTEXT``),
  capped at the cache length; attention reads ``L`` keys per sequence, the real lengths mask
  the rest.

Token ids, positions, cache rows, slots and lengths are copied into the graph's static inputs
before each replay; nothing else crosses to the device. Graphs are captured the first time their
bucket is needed (capture time and memory-pool growth are logged and counted in ``stats``) and
share one memory pool: a step's logits are read before the next replay.

With DWDP each MoE layer's expert call stays out of the graphs (``graph_pieces``): the step is
one graph per stretch between MoE layers, and the prefetch wait, the expert kernels and the
``done`` of each layer run between them in stream order, as in an eager step.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from tensorrt_llm_dwdp.engine.attention import DecodeBatch, StepMetadata
from tensorrt_llm_dwdp.engine.graph_pieces import GraphBreaks, PiecewiseGraph

logger = logging.getLogger(__name__)

MIN_CONTEXT = 256


def batch_buckets(max_seqs: int, sizes: Sequence[int] | None = None) -> tuple[int, ...]:
    """Batch sizes that get a graph: ``sizes`` (each in ``[1, max_seqs]``), or by default the
    powers of two below ``max_seqs`` and ``max_seqs`` itself. A step with more sequences than
    the largest bucket runs eagerly."""
    if max_seqs < 1:
        raise ValueError(f"max_seqs={max_seqs} must be >= 1")
    if sizes is None:
        out = {max_seqs}
        b = 1
        while b < max_seqs:
            out.add(b)
            b *= 2
        return tuple(sorted(out))
    out = set()
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= max_seqs:
            raise ValueError(f"CUDA graph batch size {s!r} must be an integer in [1, "
                             f"max_batch_size={max_seqs}]")
        out.add(s)
    if not out:
        raise ValueError("CUDA graph batch sizes: the list is empty (turn graphs off instead)")
    return tuple(sorted(out))


def bucket_for(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding ``n`` sequences (None: more than the largest)."""
    for b in buckets:
        if n <= b:
            return b
    return None


def context_bucket(longest: int, max_len: int) -> int:
    """Keys a graph reads per sequence for a step whose longest context is ``longest``."""
    if not 1 <= longest <= max_len:
        raise ValueError(f"context length {longest} outside [1, cache max_len={max_len}]")
    length = MIN_CONTEXT
    while length < longest:
        length *= 2
    return min(length, max_len)


def is_decode(batch) -> bool:
    """One new token per sequence after a cached prefix (what a decode graph runs)."""
    return all(n == 1 and s > 0 for s, n in zip(batch.start_positions, batch.lengths))


@dataclass(frozen=True)
class PaddedDecode:
    """A decode step's graph inputs, padded to ``bucket`` rows (see the module docstring)."""

    input_ids: tuple[int, ...]
    positions: tuple[int, ...]
    slots: tuple[int, ...]
    lengths: tuple[int, ...]
    cache_index: tuple[int, ...]
    context: int

    @property
    def bucket(self) -> int:
        return len(self.input_ids)


def pad_decode(tokens: Sequence[int], batch, bucket: int, scratch_slot: int,
               max_len: int) -> PaddedDecode:
    """``tokens`` (one per sequence of ``batch``, a decode ``BatchInfo``) as ``bucket`` rows;
    padding rows write and read only ``scratch_slot``."""
    n = batch.num_seqs
    if not is_decode(batch):
        raise ValueError("pad_decode: not a decode step (one token per sequence after its prefix)")
    if len(tokens) != n or n > bucket:
        raise ValueError(f"pad_decode: {len(tokens)} tokens for {n} sequences, bucket {bucket}")
    if scratch_slot in batch.slots:
        raise ValueError(f"pad_decode: slot {scratch_slot} is the scratch slot")
    pad = bucket - n
    positions = tuple(batch.start_positions) + (0,) * pad
    slots = tuple(batch.slots) + (scratch_slot,) * pad
    lengths = tuple(p + 1 for p in batch.start_positions) + (1,) * pad
    return PaddedDecode(
        input_ids=tuple(int(t) for t in tokens) + (0,) * pad,
        positions=positions,
        slots=slots,
        lengths=lengths,
        cache_index=tuple(s * max_len + p for s, p in zip(slots, positions)),
        context=context_bucket(max(lengths), max_len),
    )


@dataclass
class GraphStats:
    """Captures so far, their seconds and memory-pool growth (bytes reserved by the allocator
    across the captures), and replays."""

    graphs: int = 0
    capture_seconds: float = 0.0
    pool_bytes: int = 0
    replays: int = 0


class _Captured:
    """One bucket's static inputs, metadata and piecewise graph."""

    FIELDS = ("input_ids", "positions", "slots", "lengths", "cache_index")

    def __init__(self, bucket: int, context: int, device: torch.device) -> None:
        # one [fields, bucket] tensor: a step's inputs move in one copy (pinned host side)
        self.inputs = torch.zeros(len(self.FIELDS), bucket, dtype=torch.long, device=device)
        self.host = torch.zeros(len(self.FIELDS), bucket, dtype=torch.long,
                                pin_memory=device.type == "cuda")
        self.tensors = {f: self.inputs[i] for i, f in enumerate(self.FIELDS)}
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        t = self.tensors
        # The graph's step metadata: no BatchInfo (padding rows share the scratch slot), slots
        # gathered (never a slice view, whose bounds would be baked into the graph).
        self.meta = StepMetadata(None, t["cache_index"], None, (), None, (),
                                 DecodeBatch(t["slots"], t["lengths"], context, None))
        self.graph: PiecewiseGraph | None = None

    def load(self, padded: PaddedDecode) -> None:
        """Copy a step's inputs in, asynchronously; the pinned buffer is rewritten only once the
        previous step's copy out of it is done (the engine has synced by then anyway)."""
        if self._copied is not None:
            self._copied.synchronize()
        self.host.copy_(torch.tensor([getattr(padded, f) for f in self.FIELDS], dtype=torch.long))
        self.inputs.copy_(self.host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()


class DecodeGraphs:
    """Captures and replays ``model.run_step`` for decode steps (see the module docstring).

    ``cache`` must hold ``max_seqs + 1`` slots (the last is the scratch slot); ``breaks`` is
    the ``GraphBreaks`` the model's DWDP MoE layers were given (their expert calls stay out of
    the graphs). ``batch_sizes``: the buckets (``batch_buckets``)."""

    def __init__(self, model, cache, *, max_seqs: int, device: torch.device | str,
                 breaks: GraphBreaks, batch_sizes: Sequence[int] | None = None) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}")
        if cache.max_seqs < max_seqs + 1:
            raise ValueError(f"decode graphs need a KV cache with a scratch slot: {max_seqs + 1} "
                             f"slots, got {cache.max_seqs}")
        self.model = model
        self.cache = cache
        self.breaks = breaks
        self.scratch_slot = max_seqs
        self.buckets = batch_buckets(max_seqs, batch_sizes)
        self.pool = torch.cuda.graph_pool_handle()
        self.stats = GraphStats()
        self._graphs: dict[tuple[int, int], _Captured] = {}

    def bucket(self, batch) -> int | None:
        """The batch-size bucket whose graph runs ``batch`` (None: run it eagerly)."""
        return bucket_for(batch.num_seqs, self.buckets) if is_decode(batch) else None

    def run(self, tokens: Sequence[int], batch) -> torch.Tensor:
        """Logits ``[num_seqs, vocab]`` fp32 of decode step ``batch`` (its ``bucket`` is not
        None), captured first if its bucket has no graph yet."""
        b = self.bucket(batch)
        if b is None:
            raise ValueError(f"no decode graph for {batch.num_seqs} sequences (buckets "
                             f"{self.buckets}, decode steps only)")
        padded = pad_decode(tokens, batch, b, self.scratch_slot, self.cache.max_len)
        key = (b, padded.context)
        entry = self._graphs.get(key)
        if entry is None:
            entry = _Captured(b, padded.context, self.device)
            entry.load(padded)
            self._capture(key, entry)
            self._graphs[key] = entry
        else:
            entry.load(padded)
        self.stats.replays += 1
        return entry.graph.replay()[:batch.num_seqs]

    def _capture(self, key: tuple[int, int], entry: _Captured) -> None:
        t = entry.tensors

        def step() -> torch.Tensor:
            return self.model.run_step(t["input_ids"], t["positions"], entry.meta, self.cache)

        torch.cuda.synchronize(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        start = time.perf_counter()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            # One eager run first: lazy initialisations (cuBLAS workspaces, kernels' first
            # calls, expert tables) must not happen inside a capture. It writes this step's
            # cache rows, which the replay below writes again.
            self.breaks.mode = "warmup"
            try:
                step()
            finally:
                self.breaks.mode = None
            graph = PiecewiseGraph(self.breaks, self.pool)
            graph.capture(step)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        grown = torch.cuda.memory_reserved(self.device) - reserved
        entry.graph = graph
        self.stats.graphs += 1
        self.stats.capture_seconds += seconds
        self.stats.pool_bytes += max(0, grown)
        logger.info("captured the decode graph of %d sequences x %d context positions in %.3f s "
                    "(%d piece(s), %d host call(s) between them; memory reserved +%.1f MiB, "
                    "%d graph(s) so far)", key[0], key[1], seconds, len(graph.graphs),
                    graph.num_breaks, grown / 2**20, self.stats.graphs)
