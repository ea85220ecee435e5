"""StepSequencer: the per-step protocol of one rank -- which MoE layer computes next, which
prefetches are queued, and which ping-pong buffer each one uses.

Layers are prefetched in registration order. The k-th prefetch of the run (k = step * L + pos)
lands in buffer ``k % 2`` (``pos % 2`` when L is even), so the layer two ahead, wrapping into
the next step, refills the buffer the finished layer read; counting across steps keeps odd
layer counts safe at the wrap-around. ``acquire`` (behind ``weights`` / ``composite_weights``)
makes compute wait for the layer's prefetch, ``done`` frees its buffer and queues the prefetch
two ahead, ``fill`` (``start_step``) makes sure the step's first two are queued, ``abort``
skips to the next step boundary and ``requeue`` drops what was queued beyond the layer that
computes next (after a failover the prefetches may have read a dead peer). Calls out of order
raise DwdpStateError naming the layer expected.
"""
from __future__ import annotations

from typing import Any, Sequence

from tensorrt_llm_dwdp.dwdp.copy_plan import CopyPlan
from tensorrt_llm_dwdp.dwdp.errors import DwdpStateError
from tensorrt_llm_dwdp.dwdp.prefetch_buffer import NUM_BUFFERS
from tensorrt_llm_dwdp.dwdp.stats import StatsRecorder


class StepSequencer:
    """Sequence numbers of the layers computed and the prefetches queued; ``engine`` (a copy
    engine, or None when there is nothing to copy) runs ``plans[pos][buffer]``."""

    def __init__(self, layers: Sequence[int], engine: Any, stats: StatsRecorder) -> None:
        self.layers = list(layers)
        self.pos_of = {layer: pos for pos, layer in enumerate(self.layers)}
        self.n = len(self.layers)
        self.engine = engine
        self.stats = stats
        self.current = 0   # sequence number of the next layer to compute
        self.queued = 0    # sequence number of the next prefetch to queue
        self.plans: list[list[CopyPlan]] = []
        self.host_bytes: list[list[int]] = []

    def set_plans(self, plans: list[list[CopyPlan]], host_bytes: list[list[int]]) -> None:
        """What each later prefetch of (position, buffer) copies, and its host-store bytes."""
        self.plans, self.host_bytes = plans, host_bytes

    def mid_step_layer(self) -> int | None:
        """The layer to compute next while a step is under way; None at a step boundary."""
        return self.layers[self.current % self.n] if self.current % self.n else None

    def fill(self) -> None:
        """Queue prefetches until the next two layers are (being) prefetched."""
        while self.queued < self.current + NUM_BUFFERS:
            self._queue(self.queued)

    def acquire(self, what: str, layer_idx: int) -> tuple[int, int]:
        """``(position, buffer)`` of ``layer_idx``, the layer due now; its prefetch is waited
        for (GPU: by the compute stream; CPU: the caller blocks)."""
        pos, seq = self._due(what, layer_idx)
        if self.engine is not None:
            self.engine.wait(seq & 1, pos)
        return pos, seq & 1

    def done(self, layer_idx: int) -> None:
        """``layer_idx``'s compute is issued: its buffer refills with the layer two ahead."""
        _, seq = self._due("done", layer_idx)
        if self.engine is not None:
            self.engine.compute_done(seq & 1)
        self.current = seq + 1
        while self.queued <= seq + NUM_BUFFERS:
            self._queue(self.queued)

    def abort(self) -> None:
        """Skip the rest of the step: both buffers are free, the next step starts clean."""
        if self.engine is not None:
            for b in range(NUM_BUFFERS):
                self.engine.compute_done(b)
        boundary = -(-self.current // self.n) * self.n
        self.current = boundary
        self.queued = max(self.queued, boundary)

    def requeue(self) -> None:
        """Forget the prefetches queued ahead (at a step boundary): they are queued again."""
        self.queued = self.current

    def _due(self, what: str, layer_idx: int) -> tuple[int, int]:
        seq = self.current
        pos = self.pos_of.get(layer_idx)
        if pos is None or seq >= self.queued or pos != seq % self.n:
            raise self.error(what, layer_idx)
        return pos, seq

    def _queue(self, seq: int) -> None:
        pos = seq % self.n
        if self.engine is not None:
            self.engine.submit(seq & 1, self.plans[pos][seq & 1], pos)
            self.stats.host_bytes += self.host_bytes[pos][seq & 1]
        self.queued = seq + 1

    def error(self, what: str, layer_idx: int | None = None) -> DwdpStateError:
        """Why ``what(layer_idx)`` is out of place now."""
        call = f"{what}({'' if layer_idx is None else layer_idx})"
        if layer_idx is not None and layer_idx not in self.pos_of:
            return DwdpStateError(f"{call}: layer {layer_idx} is not registered "
                                  f"(registered: {self.layers})")
        if self.current >= self.queued:
            return DwdpStateError(f"{call} before start_step()")
        expected = self.layers[self.current % self.n]
        return DwdpStateError(
            f"{call} out of order: layer {expected} is next; MoE layers must call weights(i) "
            f"then done(i) in registration order {self.layers}")
