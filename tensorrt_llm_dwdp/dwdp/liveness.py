"""Liveness of a DWDP group's ranks on one node: process checks and heartbeats.

On CPU ranks a dead peer's shared memory stays readable, and on GPUs an IPC mapping gives no
signal when its exporter dies, so a copy cannot tell. Each rank therefore asks, about every
peer whose memory it reads:

* **process check** (same node, same pid namespace): ``/proc/<pid>/stat`` of the peer's process,
  matched by its start time (a reused pid is another process). The peer is *down* once the
  process is gone, a zombie, or has ``PF_EXITING`` set. The kernel sets ``PF_EXITING`` before it
  tears down the address space and closes the GPU driver's files, so a peer seen neither
  exiting nor gone at time t had all its memory intact before t: a step whose copies completed
  before a clean check read valid bytes. Cost: one small file read per peer (~10-20 us).
* **heartbeat** (any node): each rank's heartbeat thread stamps ``CLOCK_MONOTONIC`` ns into its
  slot of the group's control block every ``heartbeat_interval_s``; a peer whose stamp is older
  than ``peer_dead_after_s`` has stopped answering (hung, stopped, starved) and is declared
  down. Its memory is still intact, but it is no longer trusted to come back in time.

A rank checks at every step boundary (``DwdpManager.start_step`` / ``end_step``), so a killed
peer is noticed at the end of the step during which it died, a hung one ``peer_dead_after_s``
after its last heartbeat.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

logger = logging.getLogger(__name__)

PF_EXITING = 0x4  # include/linux/sched.h
ALIVE, EXITING, GONE = "alive", "exiting", "gone"


@dataclass(frozen=True)
class ProcIdentity:
    """A process as the control block records it: pid, start time (clock ticks since boot,
    field 22 of /proc/<pid>/stat) and pid-namespace inode (0 where /proc does not say)."""

    pid: int
    start_time: int
    pid_ns: int

    @classmethod
    def current(cls) -> "ProcIdentity":
        pid = os.getpid()
        stat = _read_stat(pid)
        return cls(pid, int(stat[19]) if stat else 0, pid_namespace())


def pid_namespace(pid: int | str = "self") -> int:
    """Inode of the pid namespace of ``pid`` (0 if unknown)."""
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return 0


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 = state), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def process_state(ident: ProcIdentity) -> str:
    """``ALIVE``, ``EXITING`` (zombie, dead, or PF_EXITING set) or ``GONE`` (no such process, or
    the pid now names another process)."""
    if ident.pid <= 0:
        return GONE
    stat = _read_stat(ident.pid)
    if stat is None or (ident.start_time and int(stat[19]) != ident.start_time):
        return GONE
    if stat[0] in ("Z", "X", "x") or int(stat[6]) & PF_EXITING:
        return EXITING
    return ALIVE


def can_check_process(ident: ProcIdentity) -> bool:
    """Whether this process can see ``ident``'s process (same node and pid namespace)."""
    return ident.pid > 0 and ident.pid_ns != 0 and ident.pid_ns == pid_namespace()


def now_ns() -> int:
    """CLOCK_MONOTONIC in ns: one clock for every process of the node."""
    return time.monotonic_ns()


class Heartbeat:
    """A daemon thread calling ``stamp(now_ns())`` every ``interval_s`` until ``stop``."""

    def __init__(self, stamp: Callable[[int], None], interval_s: float, name: str) -> None:
        self._stamp = stamp
        self._interval = interval_s
        self._stop = threading.Event()
        stamp(now_ns())
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._stamp(now_ns())
            except Exception:  # the control block went away under us: stop quietly
                logger.debug("heartbeat stopped", exc_info=True)
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * self._interval + 1)


def down_reason(ident: ProcIdentity, heartbeat_ns: int, dead_after_s: float,
                now: int | None = None) -> str | None:
    """Why a peer with this identity and last heartbeat is down, or None if it is up."""
    if can_check_process(ident):
        state = process_state(ident)
        if state != ALIVE:
            return f"process {ident.pid} {'exited' if state == GONE else 'is exiting'}"
    now = now_ns() if now is None else now
    silent = (now - heartbeat_ns) / 1e9
    if heartbeat_ns and silent > dead_after_s:
        return f"no heartbeat for {silent:.1f} s (peer_dead_after_s = {dead_after_s:g})"
    return None
