"""One mode's sweep on one rank: requests, timed prefill steps, per-mode counters, timeline.

Every rank runs its own steps; nothing synchronizes the timed steps except what the mode itself
does (EP's all-to-all). The ranks meet once per point after their warm-up, so the timed steps
start together (a rank still compiling kernels in its warm-up once left the other to time its
steps alone on a shared GPU). Times are device times between CUDA events on a GPU, wall clock
with the work finished on the CPU; each step's start and end are also kept on the host clock,
from which the report says whether the ranks' steps overlapped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from tensorrt_llm_dwdp.model.batch import BatchInfo
from tensorrt_llm_dwdp.parallel.spans import SpanTimer

IMBALANCES = {"equal": 1, "4x": 4}
EP_SPANS = ("ep_counts", "ep_dispatch", "ep_combine")


@dataclass(frozen=True)
class Point:
    """One sweep point: the heavy rank (rank 0) prefills ``tokens`` per step; with ``4x`` the
    other ranks prefill ``tokens // 4``."""

    tokens: int
    imbalance: str

    def tokens_of(self, rank: int) -> int:
        return self.tokens if rank == 0 else max(1, self.tokens // IMBALANCES[self.imbalance])

    @property
    def key(self) -> str:
        return f"{self.imbalance}/{self.tokens}"


def make_batch(tokens: int, seq_len: int, vocab: int, seed: int, rank: int,
               device: torch.device) -> tuple[torch.Tensor, BatchInfo]:
    """``tokens`` prompt tokens as sequences of ``seq_len`` (the last one shorter), the same
    for every mode: a function of (seed, rank, tokens)."""
    lengths = [seq_len] * (tokens // seq_len) + ([tokens % seq_len] if tokens % seq_len else [])
    g = torch.Generator().manual_seed(seed * 7919 + rank * 104729 + tokens)
    ids = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    return ids, BatchInfo.prefill(lengths)


class StepRunner:
    """Runs prefill steps of one mode's model (``BenchModel``) over a cache sized for the sweep."""

    def __init__(self, bm: Any, device: torch.device, max_seqs: int, seq_len: int) -> None:
        self.bm = bm
        self.device = device
        self.cuda = device.type == "cuda"
        self.cache = bm.model.make_cache(max_seqs, seq_len, device)

    def step(self, ids: torch.Tensor, batch: BatchInfo) -> torch.Tensor:
        if self.bm.manager is not None:
            self.bm.manager.start_step()
        with torch.inference_mode():
            return self.bm.model(ids, batch, self.cache)

    def timed(self, ids: torch.Tensor, batch: BatchInfo, steps: int
              ) -> tuple[list[float], list[tuple[float, float]]]:
        """Milliseconds of each of ``steps`` back-to-back steps, and each step's (start, end)
        in ``time.time()`` seconds (one clock for every process of a host; on a GPU the
        events' times placed after a host reading taken as the first event ran)."""
        if self.cuda:
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
            torch.cuda.synchronize(self.device)   # the first event runs as soon as it is queued
            marks[0].record()
            anchor = time.time()
            for i in range(steps):
                self.step(ids, batch)
                marks[i + 1].record()
            torch.cuda.synchronize(self.device)
            at = [anchor + marks[0].elapsed_time(m) / 1e3 for m in marks]
            return ([marks[i].elapsed_time(marks[i + 1]) for i in range(steps)],
                    [(at[i], at[i + 1]) for i in range(steps)])
        out, spans = [], []
        for _ in range(steps):
            t0, w0 = time.perf_counter(), time.time()
            self.step(ids, batch)
            out.append((time.perf_counter() - t0) * 1e3)
            spans.append((w0, w0 + out[-1] / 1e3))
        return out, spans


def _layer_totals(stats: Any) -> dict[int, tuple[float, float, int]]:
    return {s.layer_idx: (s.stall_time_s, s.copy_time_s, s.bytes_copied) for s in stats.layers}


def run_point(runner: StepRunner, point: Point, *, rank: int, seq_len: int, vocab: int,
              seed: int, warmup: int, iters: int, barrier: Callable[[], None] | None = None
              ) -> dict[str, Any]:
    """Warm up, wait at ``barrier`` (every rank's warm-up done, kernels it compiled included,
    so the ranks' timed steps start together), then time ``iters`` steps; returns this
    rank's record of the point, each timed step's (start, end) on the host clock included."""
    bm = runner.bm
    tokens = point.tokens_of(rank)
    ids, batch = make_batch(tokens, seq_len, vocab, seed, rank, runner.device)
    timer: SpanTimer | None = bm.ep.timer if bm.ep is not None else None
    before = None
    try:
        for _ in range(warmup):
            runner.step(ids, batch)
        if timer is not None:
            timer.reset()
        if bm.manager is not None:
            # Land the warm-up's copies first so their times are not counted in the timed window.
            bm.manager.synchronize()
            if runner.cuda:
                torch.cuda.synchronize(runner.device)
            before = _layer_totals(bm.manager.stats)
    finally:   # a rank whose warm-up failed still meets the others (then raises)
        if barrier is not None:
            barrier()
    lat, spans = runner.timed(ids, batch, iters)
    rec: dict[str, Any] = {
        "rank": rank, "tokens": tokens, "num_seqs": batch.num_seqs, "step_ms": lat,
        "step_spans": spans,
        "step_ms_mean": sum(lat) / len(lat),
        "tokens_per_s": tokens / (sum(lat) / len(lat) / 1e3),
    }
    if timer is not None:
        totals = timer.totals_ms()
        rec["ep_collective_ms_per_step"] = {k: totals.get(k, 0.0) / iters for k in EP_SPANS}
        rec["ep_wait_ms_per_step"] = sum(rec["ep_collective_ms_per_step"].values())
    if before is not None:
        # Land the copies queued at the end of the window (the next step's first layers) on
        # CPU ranks too, so every layer's copy is counted once per timed step.
        bm.manager.synchronize()
        if runner.cuda:
            torch.cuda.synchronize(runner.device)
        after = _layer_totals(bm.manager.stats)
        per_layer = {}
        for layer, (stall, copy, nbytes) in after.items():
            s0, c0, b0 = before[layer]
            per_layer[str(layer)] = {
                "stall_ms": (stall - s0) * 1e3 / iters,
                "copy_ms": (copy - c0) * 1e3 / iters,
                "copy_gbps": (nbytes - b0) / (copy - c0) / 1e9 if copy > c0 else 0.0,
            }
        rec["dwdp_per_layer"] = per_layer
        rec["dwdp_stall_ms_per_step"] = sum(v["stall_ms"] for v in per_layer.values())
        rec["dwdp_copy_ms_per_layer"] = (
            sum(v["copy_ms"] for v in per_layer.values()) / max(1, len(per_layer)))
    return rec


def copy_stream_of(manager: Any) -> Any:
    """The manager's prefetch (copy) stream. The manager keeps it in its GPU copy engine and
    exposes no accessor yet, so the benchmark reaches in here, in this one place."""
    return manager._engine.stream


def record_timeline(runner: StepRunner, ids: torch.Tensor, batch: BatchInfo) -> dict[str, Any] | None:
    """One DWDP step with CUDA events on both streams around every MoE layer.

    Compute stream: an event when each MoE layer starts and ends (forward hooks on its
    ``ConfigurableMoE``). Copy stream: an event right after each layer's ``done()`` (which
    enqueues the prefetch of the layer two ahead, so the event completes when that copy has
    landed), and around ``start_step``. A copy starts when both the copy stream is free and the
    layer that frees its buffer is done: ``max(previous copy end, that layer's end)``.
    Returns milliseconds relative to the step's first event; None on the CPU.
    """
    bm = runner.bm
    if not runner.cuda or bm.manager is None:
        return None
    copy_stream = copy_stream_of(bm.manager)
    moes = bm.model.moe_modules()
    ev = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
    marks: dict[str, Any] = {}
    handles = []
    for layer, moe in moes.items():
        def pre(mod, args, layer=layer):
            marks[f"moe_start/{layer}"] = e = ev()
            e.record()

        def post(mod, args, out, layer=layer):
            marks[f"moe_end/{layer}"] = e = ev()
            e.record()
            marks[f"copy_after/{layer}"] = c = ev()
            c.record(copy_stream)
        handles += [moe.register_forward_pre_hook(pre), moe.register_forward_hook(post)]
    try:
        torch.cuda.synchronize(runner.device)
        start = ev()
        start.record()
        before_step = ev()
        before_step.record(copy_stream)
        bm.manager.start_step()
        after_step = ev()
        after_step.record(copy_stream)
        with torch.inference_mode():
            bm.model(ids, batch, runner.cache)
        end = ev()
        end.record()
        torch.cuda.synchronize(runner.device)
    finally:
        for h in handles:
            h.remove()
    t = lambda e: start.elapsed_time(e)  # noqa: E731
    layers = list(moes)
    n = len(layers)
    compute, copies = [], []
    prev_moe_end = 0.0
    prev_copy_end = t(after_step)
    for p, layer in enumerate(layers):
        s, e = t(marks[f"moe_start/{layer}"]), t(marks[f"moe_end/{layer}"])
        compute.append({"layer": layer, "kind": "attention+dense", "start": prev_moe_end, "end": s})
        compute.append({"layer": layer, "kind": "moe", "start": s, "end": e})
        copy_end = t(marks[f"copy_after/{layer}"])
        target = layers[(p + 2) % n]
        copies.append({"for_layer": target, "next_step": p + 2 >= n,
                       "start": max(prev_copy_end, e), "end": max(copy_end, e)})
        prev_copy_end, prev_moe_end = copy_end, e
    return {
        "step_ms": t(end),
        "start_step_copy": {"start": t(before_step), "end": t(after_step)},
        "compute": compute,
        "copy": copies,
        "tail_ms": t(end) - prev_moe_end,
    }
