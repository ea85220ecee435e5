"""Copy engines: run copy plans into buffer b after its last reader, and let readers wait.

Both engines keep the same protocol per buffer b (0 or 1):
  ``submit(b, plan, pos)``  fill b once the compute that last read b is done
  ``wait(b, pos)``          the caller (compute) may read b after this returns / is ordered
  ``compute_done(b)``       the compute reading b has been issued

``CudaCopyEngine`` orders everything with CUDA events on a dedicated copy stream (no host
syncs); ``ThreadCopyEngine`` runs the copies in one host thread ordered by threading events
(on CPU ``done()`` runs after compute has finished, so a fill may start at once).
"""
from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from typing import Any

import torch

from tensorrt_llm_dwdp.dwdp.copy_plan import CopyPlan
from tensorrt_llm_dwdp.dwdp.errors import DwdpError
from tensorrt_llm_dwdp.dwdp.prefetch_buffer import NUM_BUFFERS
from tensorrt_llm_dwdp.dwdp.stats import StatsRecorder

logger = logging.getLogger(__name__)

_WAKE_S = 0.5


class ThreadCopyEngine:
    """CPU engine: one copy thread executing plans with memmove (the GIL is released)."""

    def __init__(self, stats: StatsRecorder, name: str = "dwdp-copy") -> None:
        self._stats = stats
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        # Jobs queued per buffer and not finished: after abort_step a buffer can hold a fill
        # nobody read plus the next one, so "ready" means none pending, not "one finished".
        self._pending = [0] * NUM_BUFFERS
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            b, plan, pos = job
            try:
                if self._error is None:
                    start = time.perf_counter()
                    for dst, src, n in zip(plan.dsts, plan.srcs, plan.sizes):
                        ctypes.memmove(dst, src, n)
                    self._stats.copy_time(pos, time.perf_counter() - start)
            except BaseException as exc:  # surfaced to the reader by wait()
                self._error = exc
            finally:
                with self._cond:
                    self._pending[b] -= 1
                    self._cond.notify_all()

    def submit(self, b: int, plan: CopyPlan, pos: int) -> None:
        if not self._thread.is_alive():
            raise DwdpError("the DWDP copy thread is not running (closed or failed)")
        with self._cond:
            self._pending[b] += 1
        self._stats.copied(pos, plan.total_bytes)
        self._jobs.put((b, plan, pos))

    def _wait_idle(self, buffers: range | tuple[int, ...]) -> float:
        """Block until no job of ``buffers`` is pending; seconds waited (0.0 if none was)."""
        with self._cond:
            if not any(self._pending[b] for b in buffers):
                return 0.0
            start = time.perf_counter()
            while any(self._pending[b] for b in buffers):
                if not self._thread.is_alive():
                    raise DwdpError("the DWDP copy thread stopped while a prefetch was pending")
                self._cond.wait(_WAKE_S)
            return time.perf_counter() - start

    def wait(self, b: int, pos: int) -> None:
        self._stats.waited(pos, self._wait_idle((b,)))
        if self._error is not None:
            raise DwdpError(f"DWDP prefetch copy failed: {self._error!r}") from self._error

    def compute_done(self, b: int) -> None:
        return None

    def synchronize(self) -> None:
        self._wait_idle(range(NUM_BUFFERS))

    def harvest(self) -> None:
        return None

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()


class _EventTimer:
    """Pairs of timing events recorded around device work; read once they completed."""

    def __init__(self, stats: StatsRecorder) -> None:
        self._stats = stats
        self._free: list[tuple[Any, Any]] = []
        self._pending: list[tuple[int, bool, Any, Any]] = []

    def start(self, stream: Any) -> tuple[Any, Any]:
        pair = self._free.pop() if self._free else (
            torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        pair[0].record(stream)
        return pair

    def stop(self, pair: tuple[Any, Any], stream: Any, pos: int, is_copy: bool) -> None:
        pair[1].record(stream)
        self._pending.append((pos, is_copy, pair[0], pair[1]))

    def harvest(self, block: bool = False) -> None:
        keep = []
        for item in self._pending:
            pos, is_copy, e0, e1 = item
            if block:
                e1.synchronize()
            elif not e1.query():
                keep.append(item)
                continue
            seconds = e0.elapsed_time(e1) / 1e3
            if is_copy:
                self._stats.copy_time(pos, seconds)
            else:
                self._stats.stall_time(pos, seconds)
            self._free.append((e0, e1))
        self._pending = keep


class CudaCopyEngine:
    """GPU engine: copies on a dedicated stream, ordered against compute by CUDA events.

    ``batched`` submits a plan as one ``cudaMemcpyBatchAsync`` (the interleaved contention plan);
    otherwise one ``cudaMemcpyAsync`` per copy. Sources may be peer device memory or registered
    host memory (the host store): both are plain pointers under UVA.
    """

    def __init__(self, device: torch.device, stats: StatsRecorder, batched: bool) -> None:
        from tensorrt_llm_dwdp.transport.cuda_ipc import check, cuda_bindings

        self._rt, _ = cuda_bindings()
        self._check = check
        self.device = device
        self._stats = stats
        self._batched = batched
        self._timer = _EventTimer(stats)
        with torch.cuda.device(device):
            self.stream = torch.cuda.Stream(device)
            self._ready = [torch.cuda.Event() for _ in range(NUM_BUFFERS)]
            self._freed = [torch.cuda.Event() for _ in range(NUM_BUFFERS)]
            current = torch.cuda.current_stream(device)
            for event in self._freed:  # buffers were allocated / filled on the current stream
                event.record(current)
        # Default: the direction follows the pointers (UVA), so one plan may mix peer memory
        # (CUDA IPC) and the pinned host store (H2D).
        self._kind = self._rt.cudaMemcpyKind.cudaMemcpyDefault
        attrs = self._rt.cudaMemcpyAttributes()
        attrs.srcAccessOrder = self._rt.cudaMemcpySrcAccessOrder.cudaMemcpySrcAccessOrderStream
        self._attrs = [attrs]

    def submit(self, b: int, plan: CopyPlan, pos: int) -> None:
        stream = self.stream
        handle = stream.cuda_stream
        with torch.cuda.device(self.device):
            stream.wait_event(self._freed[b])
            pair = self._timer.start(stream)
            if self._batched and len(plan) > 0:
                self._check(
                    self._rt.cudaMemcpyBatchAsync(list(plan.dsts), list(plan.srcs),
                                                  list(plan.sizes), len(plan), self._attrs, [0],
                                                  1, handle),
                    f"cudaMemcpyBatchAsync of layer position {pos} ({len(plan)} slices)",
                )
            else:
                for dst, src, n in zip(plan.dsts, plan.srcs, plan.sizes):
                    self._check(self._rt.cudaMemcpyAsync(dst, src, n, self._kind, handle),
                                f"cudaMemcpyAsync of layer position {pos}")
            self._ready[b].record(stream)
            self._timer.stop(pair, stream, pos, True)
        self._stats.copied(pos, plan.total_bytes)
        self._timer.harvest()

    def wait(self, b: int, pos: int) -> None:
        current = torch.cuda.current_stream(self.device)
        pair = self._timer.start(current)
        current.wait_event(self._ready[b])
        self._timer.stop(pair, current, pos, False)
        self._stats.waited(pos, 0.0)

    def compute_done(self, b: int) -> None:
        self._freed[b].record(torch.cuda.current_stream(self.device))

    def synchronize(self) -> None:
        self.stream.synchronize()

    def harvest(self) -> None:
        self._timer.harvest()

    def close(self) -> None:
        self.stream.synchronize()
        torch.cuda.current_stream(self.device).synchronize()
        self._timer.harvest(block=True)
