"""Named time spans on the current stream: CUDA events on a GPU, a wall clock on the CPU.

Recording is asynchronous on a GPU (two events per span); ``totals_ms`` synchronizes once and
sums. Used to measure time inside collectives without adding syncs to the measured path.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch


class SpanTimer:
    """Accumulates the duration of named spans recorded on ``device``'s current stream."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._events: dict[str, list[tuple[object, object]]] = defaultdict(list)
        self._wall_ms: dict[str, float] = defaultdict(float)

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        if self._cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events[name].append((start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._wall_ms[name] += (time.perf_counter() - t0) * 1e3

    def totals_ms(self) -> dict[str, float]:
        """Milliseconds per span name since the last ``reset`` (synchronizes the device)."""
        out = dict(self._wall_ms)
        if self._events:
            torch.cuda.synchronize(self.device)
            for name, pairs in self._events.items():
                out[name] = out.get(name, 0.0) + sum(s.elapsed_time(e) for s, e in pairs)
        return out

    def reset(self) -> None:
        self._events.clear()
        self._wall_ms.clear()
