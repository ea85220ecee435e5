"""SourceTable: where a rank's prefetches read from now, and the copy plans that follow.

It holds the address of every peer tensor this rank mapped (byte 0, global expert ``P * peer``),
the handle records behind them (to unmap a peer that went down), the node's host store (when
host tiers are on), and the set of peers that are down. ``plans`` turns
``tiers.source_ranges`` into one ``CopyPlan`` per (layer, buffer), links being the peers in
``peer_order`` then the host store, so a contention-aware plan deals slices across NVLink peers
and PCIe alike. Where a range lands is the view's business (``place``: a multi-view buffer slot,
or the pool pages of a composite range), so both views read the same sources, including a
down peer's experts and the rank's own host-offloaded ones from the host store. ``mark_down`` /
``take_back`` switch a peer's ranges between tiers; the caller rebuilds the plans and re-queues
what may have read a dead peer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.dwdp.copy_plan import (Copy, CopyPlan, interleaved_plan, peer_order,
                                              per_peer_plan)
from tensorrt_llm_dwdp.dwdp.errors import DwdpPeerError
from tensorrt_llm_dwdp.dwdp.tiers import (HOST, HOST_LINK, Place, SourceRange, TierLayout,
                                          describe, source_ranges, tier_copies)

PeerBases = list[dict[int, dict[str, int]]]  # [layer position][peer][name] -> byte-0 address


@dataclass(frozen=True)
class TierEvent:
    """A failover (``kind="failover"``) or rejoin (``"rejoin"``) as this rank saw it."""

    kind: str
    peer: int
    seconds: float
    message: str


class SourceTable:
    """The copy sources of one rank's buffers; plans are rebuilt after every switch."""

    def __init__(self, config: DwdpConfig, tiers: TierLayout, expert_bytes: Sequence[Mapping[str, int]],
                 bases: PeerBases, handles: Mapping[int, Any], host: Any = None,
                 own_host_copied: bool = True) -> None:
        self.config = config
        self.tiers = tiers
        self.layout = tiers.layout
        self.expert_bytes = [dict(eb) for eb in expert_bytes]
        self.bases = bases
        self.handles = dict(handles)  # peer -> its record's "handles" (per layer {name: record})
        self.host = host              # HostTiers or None
        self.own_host_copied = own_host_copied
        self.down: set[int] = set()
        self.seen: dict[int, int] = {}  # peer -> incarnation mapped

    def ranges(self) -> tuple[SourceRange, ...]:
        return source_ranges(self.tiers, self.down, own_host_copied=self.own_host_copied)

    @property
    def up_peers(self) -> list[int]:
        return [p for p in self.layout.peers if p not in self.down]

    def plans(self, num_buffers: int, place: Callable[[int, int], Place]
              ) -> tuple[list[list[CopyPlan]], list[list[int]]]:
        """``(plans[pos][b], host_bytes[pos][b])``; ``place(pos, b)`` says where the copies of
        layer ``pos`` into buffer ``b`` land (``tiers.tier_copies``). Raises DwdpPeerError if a
        range must come from a host store this rank lacks."""
        ranges = self.ranges()
        if self.host is None and any(r.tier == HOST for r in ranges):
            raise DwdpPeerError(f"DWDP rank {self.layout.rank}: peers {sorted(self.down)} are "
                                f"down and there is no host store to read their experts from")
        plans, host_bytes = [], []
        for pos in range(len(self.expert_bytes)):
            row, row_host = [], []
            for b in range(num_buffers):
                per_link = self.copies(pos, place(pos, b), ranges)
                row.append(interleaved_plan(per_link, self.config.prefetch_slice_bytes)
                           if self.config.contention_opt else per_peer_plan(per_link))
                row_host.append(sum(c[2] for c in per_link[-1]))
            plans.append(row)
            host_bytes.append(row_host)
        return plans, host_bytes

    def copies(self, pos: int, place: Place, ranges: Sequence[SourceRange] | None = None
               ) -> list[list[Copy]]:
        """Layer ``pos``'s copies from the current sources, per link: the peers in
        ``peer_order``, then the host store (last)."""
        order = peer_order(self.layout.rank, self.layout.dwdp_size)
        return tier_copies(self.layout, self.ranges() if ranges is None else ranges,
                           self.expert_bytes[pos], place,
                           lambda peer, name: self.bases[pos][peer][name],
                           lambda name: self.host.store.address(pos, name), [*order, HOST_LINK])

    def host_ranges_of(self, peers: Sequence[int]) -> list[SourceRange]:
        """The host-tier ranges the slots of ``peers`` use once they are down."""
        after = source_ranges(self.tiers, self.down | set(peers),
                              own_host_copied=self.own_host_copied)
        return [r for r in after if r.slot in peers and r.tier == HOST]

    def mark_down(self, peer: int, release: Callable[[int, Any], None]) -> str:
        """Stop reading ``peer``'s HBM: unmap it (``release(peer, record)`` per tensor); returns
        the expert ranges that move to the host store, for logs."""
        moved = describe(self.host_ranges_of([peer]))
        self.down.add(peer)
        for layer in self.handles.pop(peer, []):
            for record in layer.values():
                release(peer, record)
        return moved

    def take_back(self, peer: int, incarnation: int, handles: Any, bases: Sequence[Mapping[str, int]]
                  ) -> str:
        """``peer`` serves again: read its HBM from ``bases`` (per layer, by name)."""
        for pos, by_name in enumerate(bases):
            self.bases[pos][peer] = dict(by_name)
        self.handles[peer] = handles
        self.down.discard(peer)
        self.seen[peer] = incarnation
        return describe([r for r in self.ranges() if r.slot == peer], tier="peer")
