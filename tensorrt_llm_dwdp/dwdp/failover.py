"""PeerWatch: what a rank does at a step boundary about the peers it reads (host tiers on).

``check(at)`` runs at ``start_step`` and ``end_step``:

* **failover**: a peer this rank reads is down (``liveness``): the copies in flight land, the
  host store's checksums over that peer's ranges are verified, its mappings are dropped (and,
  if it died, what it left in /dev/shm), and its ranges move to the host store. A peer that
  *closed* (still alive, waiting for the group to close) moves the same way, without a retry.
* **rejoin**: a peer that was down restarted and serves again (a newer incarnation in the
  control block): its handle record is checked against this rank's, its memory mapped, its
  ranges move back to it, and the control block records that this rank took it back.

The caller rebuilds its plans when something switched, and re-queues its prefetches when a peer
died (they may have read it). A failed verification leaves the rank ``broken``: every later
check raises, since no source is left for that peer's experts.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping

from tensorrt_llm_dwdp.dwdp.agreement import record_problems
from tensorrt_llm_dwdp.dwdp.errors import DwdpError, DwdpMismatchError, DwdpPeerError
from tensorrt_llm_dwdp.dwdp.sources import SourceTable, TierEvent
from tensorrt_llm_dwdp.dwdp.stats import StatsRecorder

logger = logging.getLogger(__name__)


class PeerWatch:
    """Failover and rejoin of one rank's peers; ``events`` lists what happened, in order."""

    def __init__(self, rank: int, host: Any, sources: SourceTable, transport: Any,
                 stats: StatsRecorder, record: dict, events: list[TierEvent]) -> None:
        self.rank = rank
        self.host = host            # HostTiers
        self.sources = sources
        self.transport = transport
        self.stats = stats
        self.record = record        # this rank's exchange record (what a rejoiner must match)
        self.events = events
        self.broken = ""

    def check(self, at: str, synchronize: Callable[[], None]) -> tuple[bool, bool]:
        """``(switched, died)``: some source changed tiers; a peer this rank read died.
        ``synchronize()`` waits for the copies in flight (before a dead peer is unmapped)."""
        if self.broken:
            raise DwdpPeerError(self.broken)
        evicted = self.host.evicted_by()
        if evicted:
            raise DwdpPeerError(
                f"DWDP rank {self.rank} was declared down by rank(s) {evicted} (no heartbeat for "
                f"peer_dead_after_s = {self.host.config.peer_dead_after_s:g} s); restart it to "
                f"rejoin")
        died = False
        dead = self.host.dead_peers(self.sources.up_peers, self.sources.seen)
        if dead:
            leaving = {p for p in dead if self.host.leaving(p)}
            synchronize()
            self._fail_over(dead, leaving, at)
            died = bool(set(dead) - leaving)
        taken = self._take_back_rejoined()
        return bool(dead) or taken, died

    def _fail_over(self, dead: Mapping[int, str], leaving: set[int], at: str) -> None:
        start = time.perf_counter()
        ranges = self.sources.host_ranges_of(sorted(dead))
        moved = {}
        for peer in sorted(dead):
            if peer not in leaving:  # the incarnation this rank mapped, not a restarted one
                self.host.control.declare_down(self.rank, peer, self.sources.seen.get(peer, 0))
            moved[peer] = self.sources.mark_down(
                peer, self.transport.release if peer in leaving else self._release_dead)
        try:
            self.host.verify_sources(ranges, f"DWDP rank {self.rank} failing over from peer(s) "
                                             f"{sorted(dead)}")
        except DwdpError as exc:
            self.broken = f"{exc}; this rank cannot serve peer(s) {sorted(dead)}'s experts"
            raise DwdpPeerError(self.broken) from exc
        seconds = time.perf_counter() - start
        failed = len(set(dead) - leaving)
        if failed:
            self.stats.failed_over(failed, seconds)
        for peer, why in sorted(dead.items()):
            kind = "left" if peer in leaving else "failover"
            message = (f"DWDP rank {self.rank}: {kind}: peer {peer} "
                       + ("closed" if peer in leaving else f"is down ({why}, seen at {at})")
                       + f"; its experts {moved[peer]} now come from the host store "
                       f"({1e3 * seconds:.1f} ms)")
            (logger.info if peer in leaving else logger.warning)(message)
            self.events.append(TierEvent(kind, peer, seconds, message))

    def _release_dead(self, peer: int, record: Any) -> None:
        """Unmap a dead peer's tensor and remove what it can no longer remove itself. A dead
        exporter may make the unmap itself fail: logged, not raised (nothing reads it again)."""
        try:
            self.transport.release(peer, record)
        except Exception as exc:  # noqa: BLE001 - the peer is gone either way
            logger.warning("DWDP rank %d: unmapping dead peer %d's memory failed: %s",
                           self.rank, peer, exc)
        self.transport.forget(record)

    def _take_back_rejoined(self) -> bool:
        """Map peers that restarted and serve again; their ranges move back to their memory."""
        taken = False
        for peer, incarnation in self.host.rejoined(self.sources.down, self.sources.seen):
            start = time.perf_counter()
            control = self.host.control
            try:
                record = control.read_record(peer, incarnation)
                problems = record_problems([self.record, record])
                if problems:
                    raise DwdpMismatchError("; ".join(problems))
                opened = [{name: self.transport.open(peer, handle)
                           for name, handle in layer.items()} for layer in record["handles"]]
            except (DwdpError, OSError, ValueError, RuntimeError) as exc:
                logger.error("DWDP rank %d: peer %d restarted (incarnation %d) but cannot be "
                             "taken back, its experts stay on the host store: %s", self.rank,
                             peer, incarnation, exc)
                self.sources.seen[peer] = incarnation
                continue
            back = self.sources.take_back(peer, incarnation, record["handles"], opened)
            control.ack(self.rank, peer, incarnation)
            taken = True
            seconds = time.perf_counter() - start
            self.stats.rejoins += 1
            message = (f"DWDP rank {self.rank}: rejoin: peer {peer} is back (incarnation "
                       f"{incarnation}); its experts {back} come from its memory again "
                       f"({1e3 * seconds:.1f} ms)")
            logger.warning(message)
            self.events.append(TierEvent("rejoin", peer, seconds, message))
        return taken
