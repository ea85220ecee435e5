"""Prometheus text exposition of the server's counters, latency histograms and DWDP stats.

Only the event-loop thread touches these objects (handlers run there), so no locks. The DWDP
manager's stats are read by the engine thread and handed over as a plain mapping of numbers.
"""
from __future__ import annotations

import bisect
import math
from collections import defaultdict
from typing import Iterable, Mapping

PREFIX = "trtllm_dwdp_"

# Seconds: spans a CPU tiny-model prefill (ms) up to a long prompt on a busy GPU group (s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """A cumulative Prometheus histogram with fixed upper bounds."""

    def __init__(self, buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(sorted(buckets))
        if not self.bounds or any(not math.isfinite(b) for b in self.bounds):
            raise ValueError(f"histogram buckets must be finite numbers, got {self.bounds}")
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, help_text: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        running = 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            lines.append(f'{name}_bucket{{{labels}{sep}le="{_num(bound)}"}} {running}')
        lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        lines.append(f"{name}_sum{suffix} {_num(self.sum)}")
        lines.append(f"{name}_count{suffix} {self.count}")
        return lines


def _num(v: float) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class ServerMetrics:
    """Request / token counters and latency histograms of one server (worker or router)."""

    def __init__(self, role: str, kv_fallback_reasons: Iterable[str] = ()) -> None:
        self.role = role
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.active = 0
        self.aborted = 0
        self.prefill_latency = Histogram()   # arrival -> first token (time to first token)
        self.request_latency = Histogram()   # arrival -> last token
        # KV hand-overs pulled by a generation server, by path: [count, bytes, seconds].
        self.kv_transfers: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0])
        # Hand-overs that fell back to HTTP, by reason (every known reason shown, 0 or not).
        self.kv_fallbacks: dict[str, int] = {r: 0 for r in kv_fallback_reasons}
        # Seconds of the fast path's phases (share_s, open_s, alloc_s, copy_s, release_s).
        self.kv_phases: dict[str, float] = defaultdict(float)

    def record_kv_transfer(self, path: str, nbytes: int, seconds: float, *, fallback: str | None = None,
                           phases: Mapping[str, float] | None = None) -> None:
        t = self.kv_transfers[path]
        t[0] += 1
        t[1] += nbytes
        t[2] += seconds
        if fallback is not None:
            self.kv_fallbacks[fallback] = self.kv_fallbacks.get(fallback, 0) + 1
        for phase, s in (phases or {}).items():
            self.kv_phases[phase] += s

    def record_request(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] += 1

    def render(self, extra_gauges: Mapping[str, float] | None = None,
               dwdp_stats: Mapping[str, float] | None = None) -> str:
        """The ``/metrics`` body. ``dwdp_stats`` holds the manager's numeric stats (or None)."""
        role = f'role="{_escape(self.role)}"'
        lines = [
            f"# HELP {PREFIX}requests_total HTTP requests answered, by endpoint and status code.",
            f"# TYPE {PREFIX}requests_total counter",
        ]
        for (endpoint, status), n in sorted(self.requests.items()):
            lines.append(f'{PREFIX}requests_total{{{role},endpoint="{_escape(endpoint)}",'
                         f'status="{status}"}} {n}')
        counters = (
            ("prompt_tokens_total", "Prompt tokens of admitted requests.", self.prompt_tokens),
            ("generation_tokens_total", "Tokens generated.", self.generation_tokens),
            ("aborted_requests_total", "Requests aborted (client gone or error).", self.aborted),
        )
        for name, help_text, value in counters:
            lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} counter",
                      f"{PREFIX}{name}{{{role}}} {value}"]
        for name, label, help_text, values in (
                ("kv_transfer_fallbacks_total", "reason", "KV hand-overs that fell back from the "
                 "same-node path to HTTP, by reason.", self.kv_fallbacks),
                ("kv_transfer_phase_seconds_total", "phase", "Seconds of the same-node KV path, by "
                 "phase (share_s, open_s, alloc_s, copy_s, release_s).", self.kv_phases)):
            lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} counter"]
            for key, value in sorted(values.items()):
                lines.append(f'{PREFIX}{name}{{{role},{label}="{_escape(key)}"}} {_num(value)}')
        for i, (name, help_text) in enumerate((
                ("kv_transfers_total", "KV hand-overs pulled, by path (cuda_ipc, shm, http)."),
                ("kv_transfer_bytes_total", "KV bytes pulled, by path."),
                ("kv_transfer_seconds_total", "Seconds spent pulling KV (request to bytes in memory), by path."))):
            lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} counter"]
            for path, values in sorted(self.kv_transfers.items()):
                lines.append(f'{PREFIX}{name}{{{role},path="{_escape(path)}"}} {_num(values[i])}')
        gauges = {"active_requests": float(self.active), **(extra_gauges or {})}
        for name, value in sorted(gauges.items()):
            lines += [f"# TYPE {PREFIX}{name} gauge", f"{PREFIX}{name}{{{role}}} {_num(value)}"]
        lines += self.prefill_latency.render(
            f"{PREFIX}prefill_latency_seconds", "Time from arrival to the first token.", role)
        lines += self.request_latency.render(
            f"{PREFIX}request_latency_seconds", "Time from arrival to the last token.", role)
        if dwdp_stats:
            lines += render_dwdp_stats(dwdp_stats, role)
        return "\n".join(lines) + "\n"


def render_dwdp_stats(stats: Mapping[str, float], labels: str = "") -> list[str]:
    """One gauge per numeric DWDP manager stat: ``trtllm_dwdp_dwdp_<name>``.

    The manager's counters only grow, but they are exported as gauges because the server does
    not own their reset semantics (a restarted manager starts again at zero).
    """
    lines = []
    suffix = f"{{{labels}}}" if labels else ""
    for name, value in sorted(stats.items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric = f"{PREFIX}dwdp_{name}"
        lines += [f"# TYPE {metric} gauge", f"{metric}{suffix} {_num(value)}"]
    return lines
