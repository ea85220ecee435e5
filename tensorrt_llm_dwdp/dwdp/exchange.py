"""GroupExchange: how a rank joins its group -- the handle exchange, mapping its peers, attaching
to the node's host store, or, for a restarted rank, rejoining its running group.

A normal start is collective, every rank of the group in the same rounds (``allgather``), so a
failure anywhere fails every rank together:

1. handle records (config, expert count, transport, layers with names / dtypes / shapes, the
   exported handles; with host tiers rank 0's also says where the store is, having created it):
   any disagreement raises DwdpMismatchError on every rank (``agreement.py``);
2. "could I map my peers" (each rank maps every peer tensor, and opens the host store);
3. with host tiers, "host store filled": each rank wrote its writer part and its checksums,
   then claims its slot in the control block (which from then on replaces the comm).

A restarted rank (``host_tiers.find_running_group``) has no collective: it restores its slice
from the store (``restore``), checks its record against the survivors' records in the control
block, maps the serving peers, and claims the next incarnation of its slot; the survivors take
it back at their next step (``failover.PeerWatch``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from tensorrt_llm_dwdp.comm import GroupComm
from tensorrt_llm_dwdp.dwdp.agreement import record_problems, summarize
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.dwdp.errors import DwdpError, DwdpMismatchError, DwdpPeerError
from tensorrt_llm_dwdp.dwdp.sources import PeerBases
from tensorrt_llm_dwdp.dwdp.tiers import TierLayout
from tensorrt_llm_dwdp.transport import Transport

logger = logging.getLogger(__name__)

EXCHANGE = "DWDP handle exchange"
OPEN = "DWDP peer mapping"
FILL = "DWDP host store fill"

Allgather = Callable[[str, Any], list[Any]]  # (round name, payload) -> every rank's payload


@dataclass
class Joined:
    """What joining produced: the mapped peer tensors (``[pos][peer][name]`` -> address of the
    peer tensor's byte 0), the peers not read from the start and the incarnation of each mapped
    peer (None: everyone's first), and, after a rejoin, the message to log."""

    bases: PeerBases
    down: list[int] = field(default_factory=list)
    seen: dict[int, int] | None = None
    message: str = ""


class GroupExchange:
    """One rank's side of joining its group. ``host`` is the rank's ``HostTiers`` as soon as it
    is created or opened (its owner closes it, also when joining fails); ``peer_handles`` the
    handle records of the peers mapped, by peer."""

    def __init__(self, config: DwdpConfig, tiers: TierLayout, comm: GroupComm,
                 transport: Transport, device: torch.device, allgather: Allgather,
                 running: Any = None) -> None:
        self.config = config
        self.tiers = tiers
        self.layout = tiers.layout
        self.rank = self.layout.rank
        self.comm = comm
        self.transport = transport
        self.device = device
        self.allgather = allgather
        self.running = running   # host_tiers.RunningGroup when restarting into a live group
        self.host: Any = None    # host_tiers.HostTiers
        self.peer_handles: dict[int, Any] = {}

    # ------------------------------------------------------------------ a normal start
    def run(self, record: dict, own: Sequence[Mapping[str, torch.Tensor]],
            host_parts: Sequence[Mapping[str, torch.Tensor] | None]) -> Joined:
        """The collective rounds above; ``record``: this rank's handle record, ``own`` its
        registered tensors and ``host_parts`` its host experts per layer (host tiers)."""
        tiers = self.config.tiers_enabled
        size = self.config.dwdp_size
        if tiers and self.rank == 0:
            record["tiers"] = self._create_host(own)
            if size == 1 and "error" in record["tiers"]:
                raise DwdpError(f"could not create the host store: {record['tiers']['error']}")
        if size == 1:
            bases: PeerBases = [{} for _ in own]
        else:
            records = self.allgather(EXCHANGE, record)
            failed = [(r, rec["error"]) for r, rec in enumerate(records) if "error" in rec]
            if failed:  # those ranks are alive and wait in close(): not a peer failure
                raise DwdpPeerError("; ".join(
                    f"rank {r} failed before the handle exchange: {msg}" for r, msg in failed))
            problems = record_problems(records)
            if problems:
                raise DwdpMismatchError(summarize(problems, "DWDP ranks disagree"))
            bases, error = self.open_peers(own, records)
            if tiers and self.rank != 0 and not error:
                error = self._open_host(records[0]["tiers"], own)
            statuses = self.allgather(OPEN, error)
            bad = [f"rank {r}: {msg}" for r, msg in enumerate(statuses) if msg]
            if bad:
                raise DwdpPeerError("mapping peer memory failed on " + "; ".join(bad))
            if not tiers:  # with host tiers a restarted peer maps them later: linked till close
                self.transport.after_exchange()
        if tiers:
            error = self.host.fill_all(own, host_parts, self.tiers)
            statuses = self.allgather(FILL, error) if size > 1 else [error]
            bad = [f"rank {r}: {msg}" for r, msg in enumerate(statuses) if msg]
            if bad:
                raise DwdpPeerError("filling the host store failed on " + "; ".join(bad))
            self.host.claim(1, record)
        return Joined(bases)

    def _create_host(self, own: Sequence[Mapping[str, torch.Tensor]]) -> dict:
        """Rank 0: the group's key, control block and store; ``{"key", "host"}`` or ``{"error"}``
        (carried in its exchange record, so a failure fails every rank together)."""
        from tensorrt_llm_dwdp.dwdp.host_tiers import HostTiers

        self.host, info = HostTiers.start(self.config, self.layout, list(own), self.device,
                                          group_id=self.comm.group_id)
        return info

    def _open_host(self, info: dict, own: Sequence[Mapping[str, torch.Tensor]]) -> str:
        from tensorrt_llm_dwdp.dwdp.host_tiers import HostTiers, check_same_host

        if "error" in info:
            raise DwdpPeerError(f"rank 0 could not create the host store: {info['error']}")
        message = check_same_host(list(getattr(self.comm, "hosts", None) or []))
        if message:
            raise DwdpMismatchError(message)
        self.host, info = HostTiers.start(self.config, self.layout, list(own), self.device,
                                          key=info["key"])
        return info.get("error", "")

    def open_peers(self, own: Sequence[Mapping[str, torch.Tensor]], records: list[dict],
                   peers: Sequence[int] | None = None) -> tuple[PeerBases, str]:
        """Map every tensor of ``peers`` (default: all); ``(bases, error message or "")``."""
        peers = self.layout.peers if peers is None else peers
        bases: PeerBases = []
        try:
            for pos, tensors in enumerate(own):
                bases.append({peer: {name: self.transport.open(
                    peer, records[peer]["handles"][pos][name]) for name in tensors}
                    for peer in peers})
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            logger.error("DWDP rank %d could not map peer memory: %s", self.rank, message)
            return bases, message
        self.peer_handles = {peer: records[peer]["handles"] for peer in peers}
        return bases, ""

    # ------------------------------------------------------------------ a restarted rank
    def running_specs(self) -> dict[int, tuple[int, dict]]:
        """``{layer: (position, {name: (dtype, shape)})}`` of the running group."""
        record = next(iter(self.running.records.values()))
        return {layer: (pos, tensors) for pos, (layer, tensors) in enumerate(record["layers"])}

    def rejoin_store(self) -> Any:
        """The running group's host store, opened once (``restore`` reads from it)."""
        from tensorrt_llm_dwdp.dwdp.host_tiers import HostTiers

        if self.host is None:
            self.host = HostTiers.rejoin(self.config, self.layout, self.running, self.device)
        return self.host

    def rejoin(self, record: dict, own: Sequence[Mapping[str, torch.Tensor]]) -> Joined:
        """Join through the control block: map the serving peers, claim the next incarnation
        of this rank's slot; they take this rank back at their next step."""
        running = self.running
        mine = {k: v for k, v in record.items() if k != "handles"}
        theirs = {r: {k: v for k, v in rec.items() if k != "handles"}
                  for r, rec in running.records.items()}
        problems = record_problems([mine, *theirs.values()])
        if problems:
            raise DwdpMismatchError(summarize(problems, "this rank disagrees with its running group"
                                              " (record 0 is this rank's)"))
        host = self.rejoin_store()
        records: list[dict] = [{} for _ in range(self.config.dwdp_size)]
        for r, rec in running.records.items():
            records[r] = rec
        live = [p for p in self.layout.peers if p in running.records]
        bases, error = self.open_peers(own, records, live)
        if error:
            raise DwdpPeerError(f"rejoining rank {self.rank} could not map its peers: {error}")
        control = host.control
        incarnation = control.incarnation(self.rank) + 1
        host.claim(incarnation, record)
        for p in live:
            control.ack(self.rank, p, control.incarnation(p))
        down = [p for p in self.layout.peers if p not in live]
        message = (f"DWDP rank {self.rank} rejoined group {running.key} (incarnation "
                   f"{incarnation}): experts restored from the host store; peers {live} over "
                   f"their memory" + (f", {sorted(down)} from the host store" if down else ""))
        return Joined(bases, down, {p: control.incarnation(p) for p in live}, message)
