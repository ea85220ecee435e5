"""Many steps, not one: the saturated step breakdown and a request stream with TTFT.

``saturated`` gives every rank a full queue: each rank packs its own prompts (drawn from the
traffic) into steps of ``max_num_tokens``; a DEP group runs its ranks' k-th steps together and
waits for the slowest, DWDP and replicated ranks run free. Two throughput definitions are
reported: ``own_rate`` (mean over ranks of a rank's tokens over its own step time, which for
a DEP rank includes waiting for the slowest) and ``lockstep`` (a group's tokens over S times
its slowest rank's time per step, what free-running ranks would deliver if they had to wait).

``stream`` plays Poisson arrivals through the same step model: each request joins the rank
(DEP: the group, then its rank) with the fewest outstanding (queued or running) tokens; a
rank's step takes whole prompts first-come first-served up to the budget; TTFT is the end of
the step that runs a prompt's last token minus its arrival (queueing included; no decode, no
KV transfer). Its steps are as small as the queue makes them, not saturated ones.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

import numpy as np

from tensorrt_llm_dwdp.plan.copy_model import CopyParams
from tensorrt_llm_dwdp.plan.costs import CostSource
from tensorrt_llm_dwdp.plan.deploy import (DEP, DWDP, REPLICATED, TERMS, Deployment, RankStep,
                                           group_step)
from tensorrt_llm_dwdp.plan.model import MoeModel
from tensorrt_llm_dwdp.plan.system import System
from tensorrt_llm_dwdp.plan.traffic import Chunk, Traffic, pack_steps


@dataclass(frozen=True)
class Context:
    """What every simulated step needs besides the deployment."""

    model: MoeModel
    system: System
    costs: CostSource
    copy: CopyParams
    budget: int


def group_size(dep: Deployment) -> int:
    return 1 if dep.kind == REPLICATED else dep.size


def saturated(dep: Deployment, traffic: Traffic, ctx: Context, num_steps: int,
              seed: int = 0) -> dict:
    """Mean per-rank step breakdown (ms) over ``num_steps`` group steps and tokens/s per GPU."""
    rng = np.random.default_rng(seed)
    s = group_size(dep)
    per_rank = []
    for _ in range(s):
        # one rank's full queue: enough prompts for num_steps + 1 full steps, packed in order
        lengths = traffic.sample(64, rng)
        while lengths.sum() < (num_steps + 1) * ctx.budget:
            lengths = np.concatenate([lengths, traffic.sample(64, rng)])
        per_rank.append(pack_steps(lengths, ctx.budget)[:num_steps])
    rows: list[list[RankStep]] = [
        group_step(dep, [per_rank[r][k] for r in range(s)], ctx.costs, ctx.model, ctx.system,
                   ctx.copy) for k in range(num_steps)]
    flat = [x for row in rows for x in row]
    mean = {t: float(np.mean([getattr(x, t) for x in flat])) for t in TERMS}
    mean["step"] = float(np.mean([x.step_ms for x in flat]))
    mean["copy_total"] = float(np.mean([x.copy_ms for x in flat]))
    mean["contention"] = float(np.mean([x.contention for x in flat]))
    tokens = float(np.mean([x.tokens for x in flat]))
    own = np.mean([sum(row[r].tokens for row in rows) / sum(row[r].step_ms for row in rows)
                   for r in range(s)]) * 1e3
    lock = sum(x.tokens for x in flat) / (s * sum(max(x.step_ms for x in row) for row in rows)) * 1e3
    return {"breakdown_ms": mean, "tokens_per_step": tokens,
            "tokens_per_s_per_gpu": {"own_rate": float(own), "lockstep": float(lock)}}


OVERLOAD_DRAIN = 0.1  # drain time past the last arrival, as a fraction of the arrival span
WARMUP = 0.1  # the first tenth of a stream's requests find it empty; left out of the percentiles


def default_requests(gpus: int) -> int:
    """Requests in a stream unless the user says: 500 per GPU, 2000 to 8000. With 300 (the
    first default) the TTFT median of one deployment moved from 1.0 to 2.0 s across seeds;
    with 2000 on 4 GPUs it stays within about 10% of its median (tests/unit/test_plan_model.py)."""
    return min(8000, max(2000, 500 * gpus))


def stream(dep: Deployment, gpus: int, traffic: Traffic, rate: float, num_requests: int,
           ctx: Context, seed: int = 0) -> dict:
    """Play ``num_requests`` Poisson arrivals at ``rate`` requests/s on ``gpus`` GPUs.

    TTFT percentiles leave out the first ``WARMUP`` of the requests (they find the ranks idle).
    A DWDP rank's copy contention follows its peers' actual copy duty at its step's start (an
    idle peer pulls nothing). Besides TTFT the result says what regime the stream ran in:
    ``busy`` (fraction of GPU time spent stepping), ``tokens_per_step`` and ``step_ms`` (means
    over the steps run), which a saturated step breakdown does not show: at the same request
    rate, a deployment whose small steps are slow (DWDP's copy floor) batches more and waits
    longer. ``overloaded``: the queue still held work long after the last arrival (the rate is
    past what this deployment serves; its TTFT grows with the number of requests)."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, num_requests))
    lengths = traffic.sample(num_requests, rng)
    s = dep.size if dep.kind == DEP else 1  # ranks that step as one: a DEP group, else a rank
    units = gpus // s
    queues = [deque() for _ in range(gpus)]  # [request, remaining, done]
    queued = np.zeros(gpus, dtype=np.int64)     # tokens waiting or running, per rank
    duty = [0.0] * gpus                         # copy duty of each rank's running step, 0 idle
    group_duty = [0.0] * gpus                   # its sum per DWDP group (index rank // S)
    stepping = [False] * units
    ttft = np.full(num_requests, np.nan)
    events: list[tuple[float, int, int]] = [(float(t), 0, i) for i, t in enumerate(arrivals)]
    heapq.heapify(events)
    pending: dict[int, list[int]] = {}          # unit -> requests its running step finishes
    running: dict[int, list[tuple[int, int]]] = {}  # unit -> (rank, tokens) in its step
    stats = {"steps": 0, "tokens": 0, "busy_s": 0.0}
    end_time = 0.0

    def set_duty(rank: int, value: float) -> None:
        if dep.kind == DWDP:
            group_duty[rank // dep.size] += value - duty[rank]
        duty[rank] = value

    def peers_duty(rank: int) -> float:
        if dep.kind != DWDP:
            return 0.0
        g = rank // dep.size
        return min(1.0, max(0.0, (group_duty[g] - duty[rank]) / (dep.size - 1)))

    def start(unit: int, now: float) -> None:
        ranks = range(unit * s, unit * s + s)
        chunks = [_take(queues[r], ctx.budget) for r in ranks]
        if not any(chunks):
            stepping[unit] = False
            for r in ranks:
                set_duty(r, 0.0)
            return
        steps = group_step(dep, chunks, ctx.costs, ctx.model, ctx.system, ctx.copy,
                           [peers_duty(r) for r in ranks])
        duration = max(x.step_ms for x in steps) / 1e3
        for r, x in zip(ranks, steps):
            set_duty(r, x.copy_busy)
        running[unit] = [(r, sum(c.length for c in cs)) for r, cs in zip(ranks, chunks)]
        pending[unit] = [c.request for cs in chunks for c in cs if c.prefix + c.length
                         == lengths[c.request]]
        stats["steps"] += s
        stats["tokens"] += sum(x.tokens for x in steps)
        stats["busy_s"] += duration * s
        stepping[unit] = True
        heapq.heappush(events, (now + duration, 1, unit))

    while events:
        now, kind, ident = heapq.heappop(events)
        end_time = max(end_time, now)
        if kind == 0:
            if s == 1:
                group = rank = int(queued.argmin())
            else:
                group = int(queued.reshape(units, s).sum(axis=1).argmin())
                rank = group * s + int(queued[group * s: group * s + s].argmin())
            queues[rank].append([ident, int(lengths[ident]), 0])
            queued[rank] += int(lengths[ident])
            if not stepping[group]:
                start(group, now)
        else:
            for req in pending.pop(ident):
                ttft[req] = now - arrivals[req]
            for r, n in running.pop(ident):
                queued[r] -= n
            start(ident, now)
    span = end_time - arrivals[0]
    kept = ttft[int(WARMUP * num_requests):]
    # a stable queue drains in a few steps; one that needs more than a tenth of the arrival
    # span grew all along: the rate is past capacity and TTFT grows with --requests
    drain = end_time - arrivals[-1]
    return {"rate_req_per_s": rate, "requests": num_requests,
            "overloaded": bool(num_requests > 1
                               and drain > OVERLOAD_DRAIN * (arrivals[-1] - arrivals[0])),
            "ttft_ms": {f"p{q}": float(np.percentile(kept, q) * 1e3) for q in (50, 90, 99)},
            "tokens_per_s_per_gpu": float(lengths.sum() / span / gpus),
            "busy": stats["busy_s"] / (span * gpus),
            "tokens_per_step": stats["tokens"] / max(1, stats["steps"]),
            "step_ms": stats["busy_s"] / max(1, stats["steps"]) * 1e3}


def _take(queue: deque, budget: int) -> list[Chunk]:
    """The next step's chunks from a rank's queue (FCFS; only prompts over budget split)."""
    out: list[Chunk] = []
    used = 0
    while queue and used < budget:
        req, remaining, done = queue[0]
        if used and remaining > budget - used:
            break
        take = min(remaining, budget - used)
        out.append(Chunk(req, take, done))
        used += take
        if take == remaining:
            queue.popleft()
        else:
            queue[0] = [req, remaining - take, done + take]
    return out
