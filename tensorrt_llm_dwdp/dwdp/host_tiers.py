"""HostTiers: one rank's handle on its group's host tier -- the store, the control block, its
heartbeat -- and how a restarted rank finds the group it belongs to.

The files of a group are named by a key every rank (and a restarted one) derives from its
launch environment (``group_key``): ``TRTLLM_DWDP_JOB_KEY`` (the launcher sets one per job),
else the TCP rendezvous address, else the MPI job's namespace; without any, rank 0 draws a random
key at the exchange (and a restarted rank cannot find its group).

Start-up (``DwdpManager.exchange``): rank 0 creates the control block and the store (a stale
pair from a crashed run of the same key is replaced; a live one is an error), the others open
them, every rank fills its writer part and records its checksums, then claims its slot
(``SERVING``) and starts its heartbeat. A rank restarting into a running group
(``find_running_group``) opens them instead, restores its slice from the store, posts its handle
record and claims its slot with the next incarnation; survivors take it back at their next step.
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from tensorrt_llm_dwdp.comm.base import GroupComm
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.dwdp.control import (CLOSED, SERVING, GroupControl, collect_stale_groups,
                                             unlink_group)
from tensorrt_llm_dwdp.dwdp.errors import DwdpPeerError, DwdpStateError
from tensorrt_llm_dwdp.dwdp.host_store import HostStore, StoreLayout
from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout
from tensorrt_llm_dwdp.dwdp.liveness import Heartbeat, ProcIdentity, down_reason, now_ns
from tensorrt_llm_dwdp.dwdp.tiers import HOST, SourceRange, writer_range

logger = logging.getLogger(__name__)

ENV_JOB_KEY = "TRTLLM_DWDP_JOB_KEY"
_POLL_S = 0.02


def group_key(group_id: int, environ: Mapping[str, str] | None = None) -> str | None:
    """The files' key of DWDP group ``group_id`` of this launch, or None if the environment
    names no job (then rank 0 draws one)."""
    from tensorrt_llm_dwdp.comm.tcp import ENV_ADDR, ENV_PORT, ENV_RANK

    env = os.environ if environ is None else environ
    if env.get(ENV_JOB_KEY):
        raw = f"job:{env[ENV_JOB_KEY]}"
    elif ENV_RANK in env and ENV_ADDR in env and ENV_PORT in env:
        raw = f"tcp:{env[ENV_ADDR]}:{env[ENV_PORT]}"
    elif env.get("PMIX_NAMESPACE"):
        raw = f"pmix:{env['PMIX_NAMESPACE']}"
    elif env.get("OMPI_MCA_ess_base_jobid"):
        raw = f"ompi:{env['OMPI_MCA_ess_base_jobid']}"
    else:
        return None
    return hashlib.sha1(f"{raw}:{group_id}".encode()).hexdigest()[:16]


def random_key() -> str:
    return secrets.token_hex(8)


def store_layout(num_experts: int, own: Iterable[Mapping[str, Any]]) -> StoreLayout:
    """The store layout of registered layers (``{name: tensor [n, ...]}``, n >= 1)."""
    layers = []
    for tensors in own:
        layers.append({name: t[0].numel() * t.element_size() for name, t in tensors.items()})
    return StoreLayout.of(num_experts, layers)


def layer_specs_layout(num_experts: int, layers: list) -> StoreLayout:
    """The store layout from an exchange record's ``layers`` (``[(idx, {name: (dtype, shape)})]``)."""
    out = []
    for _, tensors in layers:
        row = {}
        for name, (dtype, shape) in tensors.items():
            itemsize = torch.empty((), dtype=parse_dtype(dtype)).element_size()
            per_expert = itemsize
            for d in shape[1:]:
                per_expert *= d
            row[name] = per_expert
        out.append(row)
    return StoreLayout.of(num_experts, out)


def parse_dtype(text: str):
    """``"torch.uint8"`` -> ``torch.uint8`` (exchange records carry dtypes as text)."""
    dtype = getattr(torch, text.rsplit(".", 1)[-1], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {text!r} in a DWDP handle record")
    return dtype


class DetachedComm(GroupComm):
    """The group of a rank that restarted into a running group: it has a rank and a size, but
    no collectives (the group's comm died with the old process; the control block replaces it)."""

    def __init__(self, rank: int, size: int, group_id: int = 0) -> None:
        self.rank, self.size, self.group_id = rank, size, group_id
        self.hosts: list[str] = []

    def allgather(self, obj: Any, timeout_s: float, what: str) -> list[Any]:
        raise DwdpStateError(f"{what}: a rejoined DWDP rank has no group collective; it talks to "
                             f"its peers through the control block")

    def close(self) -> None:
        return None

    def describe(self) -> str:
        return f"rejoined group {self.group_id} rank {self.rank}/{self.size}"


@dataclass
class RunningGroup:
    """What a restarted rank learns before it loads anything: the group's control block, the
    survivors' handle records (by rank) and its own position."""

    key: str
    rank: int
    control: GroupControl
    records: dict[int, dict]


def find_running_group(config: DwdpConfig, environ: Mapping[str, str] | None = None
                       ) -> RunningGroup | None:
    """The running group this process restarts into, or None for a normal start.

    It is a rejoin when the group's control block exists, another rank of it is alive and this
    rank's slot is not (same position: ``TRTLLM_DWDP_RANK``, or the MPI rank).
    """
    from tensorrt_llm_dwdp.comm.tcp import ENV_GROUP, ENV_RANK

    env = os.environ if environ is None else environ
    if not config.tiers_enabled or config.dwdp_size < 2 or ENV_RANK not in env:
        return None
    rank, group = int(env[ENV_RANK]), int(env.get(ENV_GROUP, "0"))
    key = group_key(group, env)
    control = GroupControl.probe(key) if key else None
    if control is None:
        return None
    live = control.live_ranks()
    if not [r for r in live if r != rank]:
        control.close()  # stale block of a finished or crashed run: a normal start replaces it
        return None
    if rank in live:
        control.close()
        raise DwdpPeerError(
            f"DWDP rank {rank} of group {key} is already running ({control.describe(rank)}); "
            f"a second process cannot take its place")
    if control.size != config.dwdp_size:
        size = control.size
        control.close()
        raise DwdpPeerError(f"the running group {key} has {size} ranks, this config "
                            f"dwdp_size={config.dwdp_size}")
    records = {}
    for r in live:
        if control.state(r) == SERVING:
            records[r] = control.read_record(r, control.incarnation(r))
    if not records:
        control.close()
        raise DwdpPeerError(f"the running group {key} has no serving rank to rejoin yet "
                            f"(ranks {live} are still starting): retry shortly")
    return RunningGroup(key, rank, control, records)


class HostTiers:
    """A rank's open store + control block + heartbeat; ``close`` releases them."""

    def __init__(self, config: DwdpConfig, layout: ExpertLayout, key: str,
                 control: GroupControl, store: HostStore) -> None:
        self.config = config
        self.layout = layout
        self.key = key
        self.control = control
        self.store = store
        self.rank = layout.rank
        self._heartbeat: Heartbeat | None = None
        self.claimed = False

    # ------------------------------------------------------------------ start-up
    @classmethod
    def start(cls, config: DwdpConfig, layout: ExpertLayout, own: list[Mapping[str, Any]],
              device: Any, *, key: str | None = None, group_id: int = 0
              ) -> tuple["HostTiers | None", dict]:
        """At the exchange: rank 0 (``key`` None) creates the group's files, the others open
        them with rank 0's key. Returns ``(tiers, info)``; ``info`` is ``{"key", "host"}`` or
        ``{"error"}`` (a message every rank reports, so start-up fails everywhere together)."""
        import socket

        creating = key is None
        try:
            key = key or group_key(group_id) or random_key()
            lay = store_layout(layout.num_experts, own)
            tiers = (cls.create if creating else cls.open)(config, layout, key, lay)
            if getattr(device, "type", device) == "cuda":
                tiers.store.register_cuda()
        except Exception as exc:
            what = "create" if creating else "open"
            logger.error("DWDP rank %d could not %s the host store: %s", layout.rank, what, exc)
            return None, {"error": f"{type(exc).__name__}: {exc}"}
        return tiers, {"key": key, "host": socket.gethostname()}

    @classmethod
    def rejoin(cls, config: DwdpConfig, layout: ExpertLayout, running: RunningGroup,
               device: Any) -> "HostTiers":
        """A restarted rank opens its running group's store (layout from a survivor's record)."""
        record = next(iter(running.records.values()))
        lay = layer_specs_layout(layout.num_experts, record["layers"])
        tiers = cls.open(config, layout, running.key, lay, control=running.control)
        if getattr(device, "type", device) == "cuda":
            tiers.store.register_cuda()
        return tiers

    @classmethod
    def create(cls, config: DwdpConfig, layout: ExpertLayout, key: str,
               store_lay: StoreLayout) -> "HostTiers":
        """Rank 0: a fresh control block and store (replacing a stale pair of ``key``)."""
        old = GroupControl.probe(key)
        if old is not None:
            live = old.live_ranks()
            described = [old.describe(r) for r in live]
            old.close()
            if live:
                raise DwdpPeerError(
                    f"another DWDP group with key {key} is running ({'; '.join(described)}): give "
                    f"each job its own {ENV_JOB_KEY} or rendezvous port")
            logger.info("replacing the stale DWDP group files of key %s", key)
        unlink_group(key)
        collect_stale_groups()  # groups whose processes all died, e.g. a killed benchmark
        control = GroupControl.create(key, layout.dwdp_size, len(store_lay.layers),
                                      layout.num_experts, store_lay.total_bytes,
                                      store_lay.fingerprint())
        try:
            store = HostStore.create(key, store_lay)
        except BaseException:
            control.close()
            unlink_group(key)
            raise
        return cls(config, layout, key, control, store)

    @classmethod
    def open(cls, config: DwdpConfig, layout: ExpertLayout, key: str, store_lay: StoreLayout,
             control: GroupControl | None = None) -> "HostTiers":
        control = control if control is not None else GroupControl.open(key)
        try:
            control.check_fingerprint(store_lay.fingerprint(), f"DWDP rank {layout.rank}")
            store = HostStore.open(key, store_lay)
        except BaseException:
            control.close()
            raise
        return cls(config, layout, key, control, store)

    def fill(self, pos: int, resident: Mapping[str, Any], host: Mapping[str, Any] | None,
             resident_first: int, host_first: int) -> None:
        """Write this rank's writer part of layer ``pos`` from its resident tensors (experts
        from ``resident_first``) and host tensors (from ``host_first``), then its checksum."""
        lo, hi = writer_range(self.layout)
        for first, tensors in ((resident_first, resident), (host_first, host)):
            if not tensors:
                continue
            n = next(iter(tensors.values())).shape[0]
            a, b = max(lo, first), min(hi, first + n)
            if a < b:
                self.store.write(pos, a, {k: t[a - first:b - first] for k, t in tensors.items()})
        self.control.set_crc(pos, self.rank, self.store.crc(pos, lo, hi))

    def fill_all(self, own: list[Mapping[str, Any]], host_parts: list[Mapping[str, Any] | None],
                 tiers: Any) -> str:
        """``fill`` every layer from what this rank loaded (its resident tensors and, with host
        experts, the host parts); an error message, or ``""``."""
        try:
            first, _ = tiers.resident_range()
            host_first, _ = tiers.host_range()
            for pos, tensors in enumerate(own):
                self.fill(pos, tensors, host_parts[pos], first, host_first)
        except Exception as exc:
            logger.error("DWDP rank %d could not fill the host store: %s", self.rank, exc)
            return f"{type(exc).__name__}: {exc}"
        return ""

    def restore(self, pos: int, shapes: Mapping[str, tuple[str, tuple[int, ...]]],
                experts: tuple[int, int], allocate: Any, what: str) -> dict[str, Any]:
        """Tensors of layer ``pos`` holding global ``experts`` [first, stop), allocated with
        ``allocate(shape, dtype)`` (``shapes``: name -> (dtype text, shape)) and filled from the
        store after the checksums of layer ``pos``'s parts over them are verified (each layer
        is verified as it is restored, not every layer at each one)."""
        first, stop = experts
        self.store.verify(self.parts(pos, first, stop), what)
        out = {}
        for name, (dtype, shape) in shapes.items():
            t = allocate(shape, parse_dtype(dtype))
            t.view(torch.uint8).view(stop - first, -1).copy_(
                self.store.experts(pos, name, first, stop - first))
            out[name] = t
        return out

    def claim(self, incarnation: int, record: Any) -> None:
        """Post this rank's handle record, claim its slot (SERVING) and start the heartbeat."""
        self.control.post_record(self.rank, incarnation, record)
        self.control.claim(self.rank, ProcIdentity.current(), incarnation, SERVING)
        self.claimed = True
        self._heartbeat = Heartbeat(lambda t: self.control.stamp(self.rank, t),
                                    self.config.heartbeat_interval_s,
                                    name=f"dwdp-heartbeat-r{self.rank}")

    # ------------------------------------------------------------------ checks
    def parts(self, pos: int, first: int, stop: int) -> list[tuple[int, int, int, int | None]]:
        """The writer parts of layer ``pos`` overlapping experts ``[first, stop)``, with their
        recorded checksums (what ``HostStore.verify`` takes)."""
        out = []
        for w in range(self.layout.dwdp_size):
            lo, hi = writer_range(self.layout, w)
            if lo < stop and first < hi:
                out.append((pos, lo, hi, self.control.crc(pos, w)))
        return out

    def verify(self, ranges: Iterable[tuple[int, int]], what: str) -> None:
        """Check every layer's store parts covering the global expert ``ranges``."""
        parts = sorted({p for pos in range(len(self.store.layout.layers))
                        for a, b in ranges for p in self.parts(pos, a, b)})
        if parts:
            self.store.verify(parts, what)

    def verify_sources(self, sources: Iterable[SourceRange], what: str) -> None:
        self.verify([(r.first, r.first + r.count) for r in sources if r.tier == HOST], what)

    def dead_peers(self, peers: Iterable[int], seen: Mapping[int, int] | None = None
                   ) -> dict[int, str]:
        """``{peer: why}`` for the peers of ``peers`` that are down now (see ``liveness``). With
        ``seen`` (the incarnation of each peer this rank mapped), a peer that restarted since
        is down too: the process whose memory this rank maps is gone, even if the slot shows a
        live one (it restarted before this rank noticed the death)."""
        now = now_ns()
        out = {}
        for p in peers:
            inc = self.control.incarnation(p)
            if seen is not None and inc > seen.get(p, 0):
                out[p] = (f"it restarted (incarnation {inc}; this rank mapped incarnation "
                          f"{seen.get(p, 0)})")
                continue
            why = down_reason(self.control.identity(p), self.control.heartbeat(p),
                              self.config.peer_dead_after_s, now)
            if why is None and self.control.state(p) == CLOSED:
                why = "it closed"
            if why is not None:
                out[p] = why
        return out

    def leaving(self, peer: int) -> bool:
        """``peer`` closed but still runs (its memory is intact while it waits for the group
        to close): its ranges move to the host store without a retry."""
        return self.control.state(peer) == CLOSED and down_reason(
            self.control.identity(peer), self.control.heartbeat(peer),
            self.config.peer_dead_after_s) is None

    def evicted_by(self) -> list[int]:
        """Ranks that declared this rank's incarnation down (it stopped answering too long)."""
        return self.control.declared_down_by(self.rank)

    def rejoined(self, down: Iterable[int], seen: Mapping[int, int]) -> list[tuple[int, int]]:
        """``(peer, incarnation)`` of down peers that restarted and serve again."""
        out = []
        for p in down:
            inc = self.control.incarnation(p)
            if inc > seen.get(p, 0) and self.control.state(p) == SERVING and down_reason(
                    self.control.identity(p), self.control.heartbeat(p),
                    self.config.peer_dead_after_s) is None:
                out.append((p, inc))
        return out

    # ------------------------------------------------------------------ shutdown
    def close(self, timeout_s: float) -> list[int]:
        """Mark this rank closed, wait for the others to close or be down, release the store
        and control block; the last ones out unlink the group's files. Returns the ranks that
        neither closed nor went down within ``timeout_s`` (files are then left to them)."""
        import time

        ctl = self.control
        ctl.set_state(self.rank, CLOSED)
        deadline = time.monotonic() + timeout_s
        others = [r for r in range(self.layout.dwdp_size) if r != self.rank]
        while True:
            waiting = [r for r in others if ctl.state(r) != CLOSED
                       and ctl.state(r) != 0 and not self.dead_peers([r])]
            if not waiting or time.monotonic() > deadline:
                break
            time.sleep(_POLL_S)
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self.store.close()
        ctl.close()
        if not waiting:
            unlink_group(self.key)
        return waiting


def check_same_host(hosts: list[str]) -> str | None:
    """A message if a group's ranks span hosts (host tiers keep one store per node)."""
    if len(set(hosts)) <= 1:
        return None
    return (f"host_backup / host_experts_per_worker need every rank of a DWDP group on one node "
            f"(one host store per node), but the ranks run on {hosts}")


__all__ = ["DetachedComm", "HostTiers", "RunningGroup", "check_same_host", "find_running_group",
           "group_key", "layer_specs_layout", "parse_dtype", "random_key", "store_layout"]
