"""Prefetch statistics: what was copied, how long copies took, how long compute waited.

Times are seconds. On GPUs they are measured between CUDA events (copy: on the prefetch stream
around the copies; stall: on the compute stream around its wait for the prefetch event), so they
are device time and are harvested lazily once the events have completed; on CPU they are host
time of the copy thread and of ``weights()`` blocking. ``host_bytes_copied`` is the part of
``bytes_copied`` read from the node's host store (PCIe on GPUs); the tier counters count
failovers (a peer found down, its ranges moved to the host store), rejoins (moved back), the
steps run again because a peer died under them, and the peers down now.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerStats:
    """Totals for one MoE layer since the manager started."""

    layer_idx: int
    prefetches: int
    bytes_copied: int
    copy_time_s: float
    waits: int
    stall_time_s: float

    @property
    def copy_gbps(self) -> float:
        """Achieved prefetch bandwidth in GB/s (1e9 bytes/s); 0 before any timed copy."""
        return self.bytes_copied / self.copy_time_s / 1e9 if self.copy_time_s > 0 else 0.0


@dataclass(frozen=True)
class DwdpStats:
    """A snapshot of the manager's counters (``DwdpManager.stats``)."""

    prefetches: int
    bytes_copied: int
    copy_time_s: float
    waits: int
    stall_time_s: float
    layers: tuple[LayerStats, ...]
    host_bytes_copied: int = 0
    failovers: int = 0
    failover_time_s: float = 0.0
    rejoins: int = 0
    step_retries: int = 0
    peers_down: int = 0

    @property
    def copy_gbps(self) -> float:
        return self.bytes_copied / self.copy_time_s / 1e9 if self.copy_time_s > 0 else 0.0


class StatsRecorder:
    """Mutable per-layer counters; ``snapshot()`` turns them into a DwdpStats."""

    def __init__(self, layer_indices: list[int]) -> None:
        self._layers = list(layer_indices)
        n = len(self._layers)
        self._prefetches = [0] * n
        self._bytes = [0] * n
        self._copy = [0.0] * n
        self._waits = [0] * n
        self._stall = [0.0] * n
        self.host_bytes = 0
        self.failovers = 0
        self.failover_time_s = 0.0
        self.rejoins = 0
        self.step_retries = 0
        self.peers_down = 0

    def copied(self, pos: int, nbytes: int) -> None:
        self._prefetches[pos] += 1
        self._bytes[pos] += nbytes

    def failed_over(self, peers: int, seconds: float) -> None:
        self.failovers += peers
        self.failover_time_s += seconds

    def copy_time(self, pos: int, seconds: float) -> None:
        self._copy[pos] += seconds

    def waited(self, pos: int, seconds: float) -> None:
        self._waits[pos] += 1
        self._stall[pos] += seconds

    def stall_time(self, pos: int, seconds: float) -> None:
        """Add device-measured stall time of a wait already counted by ``waited``."""
        self._stall[pos] += seconds

    def snapshot(self) -> DwdpStats:
        layers = tuple(
            LayerStats(self._layers[i], self._prefetches[i], self._bytes[i], self._copy[i],
                       self._waits[i], self._stall[i])
            for i in range(len(self._layers))
        )
        return DwdpStats(
            prefetches=sum(self._prefetches), bytes_copied=sum(self._bytes),
            copy_time_s=sum(self._copy), waits=sum(self._waits), stall_time_s=sum(self._stall),
            layers=layers, host_bytes_copied=self.host_bytes, failovers=self.failovers,
            failover_time_s=self.failover_time_s, rejoins=self.rejoins,
            step_retries=self.step_retries, peers_down=self.peers_down,
        )
