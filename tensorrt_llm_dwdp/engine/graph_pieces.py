"""A function captured as CUDA graphs, split where a call must run on the host at replay.

``PiecewiseGraph.capture(fn, *args)`` records ``fn`` (run on static tensors) as a sequence of
CUDA graphs. Inside ``fn``, a call routed through ``breaks.eager(call, *args)`` ends the current
graph; at capture time it does not run (its result is a static tensor shaped like its first
argument), and at every replay it runs eagerly between the graphs before and after it, its
result copied into that static tensor. That is how a DWDP MoE layer stays outside the graphs:
its prefetch wait, its experts (whose weights sit in a ping-pong buffer that may change with
the step) and its ``done`` run in stream order at each replay, exactly as in an eager step,
while everything between two such layers replays as one graph.

Without an active capture (``mode`` None) ``eager`` just calls. During a warm-up run
(``mode`` "warmup") it returns zeros: the warm-up exists to make lazy initialisations happen
before capture, and must not step the DWDP protocol.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch


class GraphBreaks:
    """Where a captured function hands a call back to the host (see the module docstring).
    One object per engine, passed to the layers that break (``ConfigurableMoE.graph_breaks``)."""

    def __init__(self) -> None:
        self.mode: str | None = None
        self._graph: PiecewiseGraph | None = None

    def eager(self, call: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        """``call(*args)`` (a tensor shaped like ``args[0]``), or its place in a capture."""
        if self.mode is None:
            return call(*args)
        if self.mode == "warmup":
            return torch.zeros_like(args[0])
        return self._graph._break(call, args)


class PiecewiseGraph:
    """The graphs and host calls of one captured function; ``replay()`` returns its output
    (a static tensor, rewritten by every replay). ``pool``: a ``torch.cuda.graph_pool_handle``
    shared by graphs that never replay concurrently (their outputs are read between replays)."""

    def __init__(self, breaks: GraphBreaks, pool: Any) -> None:
        self.breaks = breaks
        self.pool = pool
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.calls: list[tuple[Callable[..., torch.Tensor], tuple, torch.Tensor]] = []
        self.output: torch.Tensor | None = None

    def capture(self, fn: Callable[..., torch.Tensor], *args: Any) -> None:
        """Record ``fn(*args)`` on the current (side) stream: graphs of everything between
        ``breaks.eager`` calls, the calls themselves kept for replay."""
        if self.breaks.mode is not None:
            raise RuntimeError("a capture is already under way with these graph breaks")
        self.breaks.mode, self.breaks._graph = "capture", self
        try:
            self._begin()
            self.output = fn(*args)
            self.graphs[-1].capture_end()
        except BaseException:
            if torch.cuda.is_current_stream_capturing():
                # the capture may already be invalid; the error that stopped it is the cause
                with contextlib.suppress(RuntimeError):
                    self.graphs[-1].capture_end()
            raise
        finally:
            self.breaks.mode, self.breaks._graph = None, None

    def replay(self) -> torch.Tensor:
        """Run every graph, with the host calls between them, on the current stream."""
        for i, graph in enumerate(self.graphs):
            graph.replay()
            if i < len(self.calls):
                call, args, out = self.calls[i]
                out.copy_(call(*args))
        return self.output

    @property
    def num_breaks(self) -> int:
        return len(self.calls)

    def _begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        # thread-local: other threads of a server (KV transfers, peer watches) keep using the
        # device while this one captures
        graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
        self.graphs.append(graph)

    def _break(self, call: Callable[..., torch.Tensor], args: tuple) -> torch.Tensor:
        self.graphs[-1].capture_end()
        out = torch.empty_like(args[0])  # outside any capture: a buffer of its own
        self.calls.append((call, args, out))
        self._begin()
        return out
