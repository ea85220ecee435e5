"""Prefetch sources as tiers: where each expert range of a rank's weight view comes from (pure).

Two tiers hold a group's experts: the ranks' HBM (a peer reads it over NVLink through CUDA IPC,
or shared memory on CPU ranks) and the node's host store (``host_store.py``: one copy of every
routed expert of the group in host memory, read H2D over PCIe on GPUs, memmove on CPU).

* Rank p keeps ``[P p, P p + W - H)`` of its slice in HBM (resident) and ``[P p + W - H,
  P p + W)`` only in the host store (H = ``host_experts_per_worker``, 0 unless offloading).
* A peer slot of this rank's view (the peer's head or tail, P experts) is copied from the
  peer's HBM where the peer keeps those experts resident and is up, from the host store
  otherwise (the peer is down, or offloaded them).
* This rank's own host experts get a slot of their own (``OWN_HOST``), right after its resident
  experts: copied from the host store each time like peer experts (``host_offload: prefetch``),
  or read in place from managed memory (``uvm``, no copy).

A failover marks a peer down (its ranges move to the host tier), a rejoin marks it up again:
the plans are rebuilt from :func:`source_ranges` while the buffers stay as they are, so any
weight view filled by these plans keeps working.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout

PEER = "peer"
HOST = "host"
OWN_HOST = -1   # slot (and copy link) key of this rank's own host experts / the host store
HOST_LINK = -1  # copy link key of every copy read from the host store

Copy = tuple[int, int, int]  # (dst address, src address, nbytes), as copy_plan.Copy


@dataclass(frozen=True)
class TierLayout:
    """An expert layout plus how many of each rank's own experts live only in host memory."""

    layout: ExpertLayout
    host_experts: int = 0

    def __post_init__(self) -> None:
        h, w = self.host_experts, self.layout.num_experts_per_worker
        if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < w:
            raise ValueError(f"TierLayout: host_experts must be an integer in [0, W={w}), got {h!r}")

    @property
    def resident_experts(self) -> int:
        """Own experts each rank keeps in HBM: ``W - H``."""
        return self.layout.num_experts_per_worker - self.host_experts

    def resident_range(self, rank: int | None = None) -> tuple[int, int]:
        """Global ``[start, stop)`` of the experts ``rank`` (default: this rank) keeps in HBM."""
        start, _ = self.layout.owned_range(rank)
        return start, start + self.resident_experts

    def host_range(self, rank: int | None = None) -> tuple[int, int]:
        """Global ``[start, stop)`` of ``rank``'s own experts that live only in host memory."""
        _, stop = self.layout.owned_range(rank)
        return stop - self.host_experts, stop

    def view_slots(self) -> tuple[tuple[int | None, int, int], ...]:
        """The tensors of this rank's weight view in global expert order.

        Each is ``(slot, first global expert, count)``; slot is a peer rank (a prefetch buffer),
        None (the rank's own resident tensor) or ``OWN_HOST`` (its host experts).
        """
        lay = self.layout
        out: list[tuple[int | None, int, int]] = []
        for t in range(lay.dwdp_size):
            if t != lay.rank:
                out.append((t, lay.tensor_offsets[t], lay.num_prefetch_experts))
                continue
            out.append((None, *self._span(self.resident_range())))
            if self.host_experts:
                out.append((OWN_HOST, *self._span(self.host_range())))
        return tuple(out)

    @property
    def view_offsets(self) -> tuple[int, ...]:
        """Global id of each view tensor's first expert (``ExpertWeights`` offsets)."""
        return tuple(first for _, first, _ in self.view_slots())

    @staticmethod
    def _span(r: tuple[int, int]) -> tuple[int, int]:
        return r[0], r[1] - r[0]


@dataclass(frozen=True)
class SourceRange:
    """``count`` experts landing at expert ``offset`` of buffer slot ``slot``, read from
    ``tier`` (``rank`` = the peer for PEER, -1 for HOST), global experts from ``first``."""

    slot: int
    offset: int
    first: int
    count: int
    tier: str
    rank: int

    @property
    def link(self) -> int:
        """The copy link carrying it: the peer rank, or ``HOST_LINK``."""
        return self.rank if self.tier == PEER else HOST_LINK


# where a range's bytes of one tensor land: (dst address, offset from its first expert, nbytes)
Place = Callable[[SourceRange, str, int], Sequence[tuple[int, int, int]]]


def source_ranges(tiers: TierLayout, down: Iterable[int] = (), *,
                  own_host_copied: bool = True) -> tuple[SourceRange, ...]:
    """Every copy source of this rank's buffers, peers ascending then its own host slot.

    ``down``: peers whose HBM must not be read (dead, or not joined yet). ``own_host_copied``
    False (``uvm``): the own host experts are read in place and get no range here.
    """
    lay = tiers.layout
    down = frozenset(down)
    out: list[SourceRange] = []
    for peer in lay.peers:
        first, stop = lay.fetch_range(peer)
        _, resident_stop = tiers.resident_range(peer)
        split = first if peer in down else min(stop, max(first, resident_stop))
        if split > first:
            out.append(SourceRange(peer, 0, first, split - first, PEER, peer))
        if stop > split:
            out.append(SourceRange(peer, split - first, split, stop - split, HOST, -1))
    if tiers.host_experts and own_host_copied:
        first, stop = tiers.host_range()
        out.append(SourceRange(OWN_HOST, 0, first, stop - first, HOST, -1))
    return tuple(out)


def writer_range(layout: ExpertLayout, rank: int | None = None) -> tuple[int, int]:
    """The part of the host store ``rank`` fills from what it loaded: ``[P r, P r + P)``, the
    last rank up to E. The parts partition ``[0, E)`` and each lies inside its writer's slice."""
    r = layout.rank if rank is None else rank
    p, s = layout.num_prefetch_experts, layout.dwdp_size
    start = p * r
    return start, (layout.num_experts if r == s - 1 else start + p)


def slot_place(dst: Callable[[int, str], int]) -> Place:
    """``place`` of the multi view: a range lands whole at expert ``offset`` of its slot's
    buffer, ``dst(slot, name)`` being the address of the slot's first expert of ``name``."""
    return lambda r, name, eb: [(dst(r.slot, name) + r.offset * eb, 0, r.count * eb)]


def tier_copies(layout: ExpertLayout, ranges: Sequence[SourceRange],
                expert_bytes: Mapping[str, int], place: Place,
                peer_base: Callable[[int, str], int], host_base: Callable[[str], int],
                links: Sequence[int]) -> list[list[Copy]]:
    """The copies of one layer into one buffer set, grouped by link in ``links`` order.

    ``place(range, name, expert_bytes)``: where the range's bytes of tensor ``name`` land, as
    ``(dst address, byte offset from the range's first expert, nbytes)`` pieces (``slot_place``
    for the multi view, ``CompositeViews.place`` for the composite one);
    ``peer_base(rank, name)``: address of the peer tensor's byte 0 (global expert
    ``P * rank``); ``host_base(name)``: address of global expert 0 in the host store.
    """
    per_link: dict[int, list[Copy]] = {link: [] for link in links}
    for r in ranges:
        if r.link not in per_link:
            raise ValueError(f"source range {r} uses link {r.link}, not one of {list(links)}")
        for name, eb in expert_bytes.items():
            if r.tier == PEER:
                first = r.first - layout.num_prefetch_experts * r.rank
                src = peer_base(r.rank, name) + first * eb
            else:
                src = host_base(name) + r.first * eb
            per_link[r.link].extend((dst, src + off, n) for dst, off, n in place(r, name, eb))
    return [per_link[link] for link in links]


def describe(ranges: Iterable[SourceRange], tier: str = HOST) -> str:
    """``"[6, 11) for rank 1's slot, ..."`` for the ranges of ``tier`` (for logs)."""
    parts = [f"[{r.first}, {r.first + r.count})" for r in ranges if r.tier == tier]
    return ", ".join(parts) or "none"


def check_host_tensors(own: Mapping[str, "object"], host: Mapping[str, "object"] | None,
                       host_experts: int, *, rejoining: bool = False) -> dict | None:
    """The host part a rank registers beside its resident tensors ``own``: with H > 0 the last
    H experts of its slice, same names and dtypes (None when H == 0 or when rejoining: the host
    store has them). Raises ValueError naming what is wrong."""
    if not host_experts or rejoining:
        if host:
            raise ValueError("host_tensors given but " + (
                "this rank rejoins (they are in the host store)" if host_experts
                else "dwdp_config.host_experts_per_worker is 0"))
        return None
    if host is None or sorted(host) != sorted(own):
        raise ValueError(f"host_experts_per_worker = {host_experts} needs host_tensors with the "
                         f"same names as the tensors ({sorted(own)}), got {sorted(host or {})}")
    for name, t in host.items():
        want = (host_experts,) + tuple(own[name].shape[1:])
        if tuple(t.shape) != want or t.dtype != own[name].dtype:
            raise ValueError(f"host tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected "
                             f"{own[name].dtype} {want}")
    return dict(host)
