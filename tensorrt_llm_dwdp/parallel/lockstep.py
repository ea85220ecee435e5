"""Lockstep stepping for expert parallelism: every rank of the group runs each step together.

EP's MoE layers are collectives, so a step is a step of the whole group: before each one the
ranks vote (one small all-reduce: "has anyone work?"). Nobody: every rank sleeps briefly and
returns no events. Somebody: ranks with work run their engine's step; a rank without work
joins it with an empty batch, running only its MoE layers' exchanges (it still computes the
rows its peers send to its experts). That is DEP's / DP+EP's behaviour, and why a lightly loaded
rank waits for the heaviest one: the comparison the EP serving mode exists for.

``LockstepEngine`` wraps an engine (the executor's contract: ``add_request``, ``step``,
``has_work``, ``abort``, ``export_kv``, ``stats``, ``dwdp``, ``device``) without changing it:
it counts the MoE layers the inner step ran through ``ExpertParallel.calls``; a step that ran
no forward is made up with ``join_idle``. An engine step that runs more than one forward, or
fails (even a failure the engine isolates to its own requests, ``StepFailed``), leaves the
group out of step: this rank raises a plain error, so its serving loop stops (``/health``
503) and every later step raises too, and the peers fail at their next collective within
``ep_config.timeout_s``. EP has no per-rank failure isolation; DWDP does.

A step joined idle is recorded in the inner engine's stats (``kind="idle"``, its wall and
device time): it costs the rank GPU time (its experts run its peers' rows) that no prefill
step of its own accounts for. ``vote_seconds`` is the time spent in the votes.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from tensorrt_llm_dwdp.engine.executor import StepClock
from tensorrt_llm_dwdp.moe.backends import distinct_backends
from tensorrt_llm_dwdp.parallel.group import ExpertParallelGroup

logger = logging.getLogger(__name__)


class LockstepEngine:
    """``engine`` stepped in lockstep with its expert-parallel peers (``group``); ``moes``: the
    model's MoE layers (``ConfigurableMoE`` with ``ep``), in forward order."""

    def __init__(self, engine: Any, group: ExpertParallelGroup, moes: list[Any], *,
                 idle_sleep_s: float = 0.002) -> None:
        if not moes:
            raise ValueError("LockstepEngine: the model has no MoE layers to keep in step")
        self.engine = engine
        self.group = group
        self.moes = moes
        self.idle_sleep_s = idle_sleep_s
        self.idle_steps = 0     # steps this rank joined with an empty batch
        self.group_steps = 0    # steps the group ran
        self.vote_seconds = 0.0  # in the votes that started a group step (the group's sync point)
        self._broken: BaseException | None = None
        self._clock = StepClock(engine.device, distinct_backends(moes))

    # ---- the executor contract, delegated ----------------------------------------------------
    def add_request(self, request: Any) -> None:
        self.engine.add_request(request)

    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    def export_kv(self, request_id: str) -> Any:
        return self.engine.export_kv(request_id)

    @property
    def stats(self) -> Any:
        return self.engine.stats

    @property
    def dwdp(self) -> Any:
        return self.engine.dwdp

    @property
    def device(self) -> Any:
        return self.engine.device

    def has_work(self) -> bool:
        """Always: a rank must keep stepping (voting) while any peer may have work."""
        return True

    # ---- stepping ------------------------------------------------------------------------------
    def step(self) -> list:
        if self._broken is not None:
            raise RuntimeError(f"EP rank {self.group.ep.rank}: the expert-parallel group is out of "
                               f"step since a failed step ({self._broken!r})")
        try:
            return self._step()
        except BaseException as exc:
            self._broken = exc
            raise RuntimeError(f"EP rank {self.group.ep.rank}: a step failed ({type(exc).__name__}: "
                               f"{exc}); the expert-parallel group cannot go on (its ranks are out "
                               f"of step)") from exc

    def _step(self) -> list:
        mine = self.engine.has_work()
        t0 = time.perf_counter()
        if not self.group.any(mine):
            time.sleep(self.idle_sleep_s)
            return []
        self.vote_seconds += time.perf_counter() - t0
        self.group_steps += 1
        ep = self.group.ep
        before = ep.calls
        events = self.engine.step() if mine else []
        ran = ep.calls - before
        if ran == 0:
            self.idle_steps += 1
            timing = self._clock.start()
            for moe in self.moes:
                moe.join_idle()
            start, wall_s, device_s, compiles, compile_s = self._clock.stop(timing)
            self.engine.stats.record("idle", start, wall_s, device_s, 0, 0, compiles, compile_s)
        elif ran != len(self.moes):
            raise RuntimeError(
                f"EP rank {ep.rank}: an engine step ran {ran} MoE layer calls, expected 0 or "
                f"{len(self.moes)}; lockstep needs one forward per step")
        return events
