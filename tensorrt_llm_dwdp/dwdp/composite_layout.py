"""Composite expert view arithmetic: where every byte of one ``[E, ...]`` tensor comes from (pure).

A composite view of one registered tensor is a reserved virtual range of ``total_bytes`` in
which global expert ``e`` sits at ``base + e * expert_bytes``, exactly as in one rank that holds
all experts. The range is built from pages of ``page_bytes`` (the device's mapping granularity):

```
 0                 page_start          page_end                 total_bytes
 | pool pages (pre) | this rank's allocation | pool pages (post) |
                    ^ lead ^ own experts ^ trail ^
```

* The rank's own allocation spans the pages that hold its experts ``[start, stop)``; its tensor
  starts ``data_offset`` bytes into it, so mapping the allocation a second time at
  ``base + page_start`` puts own expert ``e`` at ``base + e * expert_bytes`` without a copy.
* The bytes of that allocation outside its own experts (the leading and trailing edges) belong
  to neighbouring experts. Weights are constant, so they are filled once from their owners at
  the exchange (``edge_copies``) and are shared by both buffers.
* Everything else is pool-backed (one pool per ping-pong buffer) and refilled by the prefetch
  (``prefetch_copies``); copies never write into the own allocation.

Copies are ``(dst_offset, peer, src_offset, nbytes)``: ``dst_offset`` inside the composite
range, ``src_offset`` inside ``peer``'s own tensor (whose byte 0 is expert ``P * peer``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout


@dataclass(frozen=True)
class CompositeCopy:
    """``nbytes`` from byte ``src_offset`` of ``peer``'s own tensor to byte ``dst_offset`` of the
    composite range."""

    dst_offset: int
    peer: int
    src_offset: int
    nbytes: int


def align_down(value: int, alignment: int) -> int:
    return value // alignment * alignment


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def check_page_bytes(page_bytes: int, minimum: int, what: str = "page size") -> int:
    """``page_bytes`` if it is a power of two and a multiple of ``minimum`` (the device's
    smallest mapping unit), else ValueError naming both."""
    if isinstance(page_bytes, bool) or not isinstance(page_bytes, int) or page_bytes <= 0:
        raise ValueError(f"{what} must be a positive integer, got {page_bytes!r}")
    if page_bytes & (page_bytes - 1):
        raise ValueError(f"{what} {page_bytes} is not a power of two")
    if page_bytes % minimum:
        raise ValueError(f"{what} {page_bytes} is not a multiple of the device's mapping "
                         f"granularity {minimum}")
    return page_bytes


@dataclass(frozen=True)
class CompositeRange:
    """The composite layout of one tensor (per-expert size ``expert_bytes``) on one rank.

    Build with ``CompositeRange.of(layout, expert_bytes, page_bytes)``; all offsets are bytes.
    """

    expert_bytes: int
    num_experts: int
    start: int          # first own expert
    stop: int           # one past the last own expert
    page_bytes: int
    page_start: int = field(init=False)
    page_end: int = field(init=False)
    total_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        if self.expert_bytes <= 0:
            raise ValueError(f"expert_bytes must be positive, got {self.expert_bytes}")
        if not 0 <= self.start < self.stop <= self.num_experts:
            raise ValueError(f"own experts [{self.start}, {self.stop}) outside "
                             f"[0, {self.num_experts})")
        check_page_bytes(self.page_bytes, 1)
        eb, page = self.expert_bytes, self.page_bytes
        object.__setattr__(self, "page_start", align_down(self.start * eb, page))
        object.__setattr__(self, "page_end", align_up(self.stop * eb, page))
        object.__setattr__(self, "total_bytes", align_up(self.num_experts * eb, page))

    @classmethod
    def of(cls, layout: "ExpertLayout", expert_bytes: int, page_bytes: int) -> "CompositeRange":
        start, stop = layout.owned_range()
        return cls(expert_bytes, layout.num_experts, start, stop, page_bytes)

    # ------------------------------------------------------------------ regions
    @property
    def tensor_bytes(self) -> int:
        """Bytes of the ``[E, ...]`` tensor (the range's tail beyond it is padding)."""
        return self.num_experts * self.expert_bytes

    @property
    def data_offset(self) -> int:
        """Byte of the own allocation where own expert ``start`` begins."""
        return self.start * self.expert_bytes - self.page_start

    @property
    def allocation_bytes(self) -> int:
        """Size of the own allocation: the pages that hold the own experts."""
        return self.page_end - self.page_start

    @property
    def pool_regions(self) -> tuple[tuple[int, int], ...]:
        """Pool-backed ``[lo, hi)`` byte ranges of the composite (pre, post; empty ones left out)."""
        return tuple(r for r in ((0, self.page_start), (self.page_end, self.total_bytes))
                     if r[1] > r[0])

    @property
    def pool_bytes(self) -> int:
        return sum(hi - lo for lo, hi in self.pool_regions)

    @property
    def edges(self) -> tuple[tuple[int, int], ...]:
        """Bytes of neighbouring experts inside the own allocation (filled once from peers)."""
        lead = (self.page_start, self.start * self.expert_bytes)
        trail = (self.stop * self.expert_bytes, min(self.page_end, self.tensor_bytes))
        return tuple(r for r in (lead, trail) if r[1] > r[0])

    @property
    def edge_bytes(self) -> int:
        return sum(hi - lo for lo, hi in self.edges)

    # ------------------------------------------------------------------ copies
    def _sources(self, layout: "ExpertLayout") -> list[tuple[int, int, int]]:
        """``(peer, lo, hi)``: global byte ranges this rank fetches, and from whom."""
        eb = self.expert_bytes
        return [(p, a * eb, b * eb) for p in layout.peers for a, b in [layout.fetch_range(p)]]

    def _copies(self, layout: "ExpertLayout", regions, order) -> list[CompositeCopy]:
        out = []
        sources = {p: (lo, hi) for p, lo, hi in self._sources(layout)}
        peer_start = {p: layout.num_prefetch_experts * p * self.expert_bytes for p in sources}
        for peer in order:
            lo, hi = sources[peer]
            for r_lo, r_hi in regions:
                a, b = max(lo, r_lo), min(hi, r_hi)
                if b > a:
                    out.append(CompositeCopy(a, peer, a - peer_start[peer], b - a))
        return out

    def prefetch_copies(self, layout: "ExpertLayout",
                        order: tuple[int, ...] | list[int] | None = None) -> list[CompositeCopy]:
        """What one prefetch of this tensor copies: every fetched byte that lies on pool pages,
        peer by peer in ``order`` (default: ascending)."""
        return self._copies(layout, self.pool_regions, order or layout.peers)

    def edge_copies(self, layout: "ExpertLayout") -> list[CompositeCopy]:
        """What the exchange copies once into the own allocation's edges."""
        return self._copies(layout, self.edges, layout.peers)


@dataclass(frozen=True)
class CompositeFootprint:
    """Memory of the composite views of one rank against the multi-B view (bytes)."""

    own_bytes: int          # own allocations (experts + edges)
    pool_bytes: int         # both pools together
    reserved_bytes: int     # virtual address space of every (layer, buffer) range
    multi_own_bytes: int    # the same experts as plain tensors
    multi_buffer_bytes: int  # the multi-B prefetch buffers

    @property
    def overhead_bytes(self) -> int:
        return self.own_bytes + self.pool_bytes - self.multi_own_bytes - self.multi_buffer_bytes


def footprint(layout: "ExpertLayout", layers: list[dict[str, int]], page_bytes: int,
              num_buffers: int = 2) -> CompositeFootprint:
    """The composite views' memory for ``layers`` (per layer ``{name: expert_bytes}``) with pages
    of ``page_bytes``; pools are shared by all layers of one buffer, so each is as large as the
    largest layer's pool-backed bytes."""
    own = pool = reserved = multi_own = 0
    fetched = (layout.num_experts - layout.num_experts_per_worker)
    largest_multi = 0
    for names in layers:
        layer_pool = layer_multi = 0
        for eb in names.values():
            r = CompositeRange.of(layout, eb, page_bytes)
            own += r.allocation_bytes
            layer_pool += r.pool_bytes
            reserved += num_buffers * r.total_bytes
            multi_own += layout.num_experts_per_worker * eb
            layer_multi += fetched * eb
        pool = max(pool, layer_pool)
        largest_multi = max(largest_multi, layer_multi)
    return CompositeFootprint(own, num_buffers * pool, reserved, multi_own,
                              num_buffers * largest_multi)
