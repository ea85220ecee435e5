"""Composite expert view arithmetic: where every byte of one ``[E, ...]`` tensor comes from (pure).

A composite view of one registered tensor is a reserved virtual range of ``total_bytes`` in
which global expert ``e`` sits at ``base + e * expert_bytes``, exactly as in one rank that holds
all experts. The range is built from pages of ``page_bytes`` (the device's mapping granularity):

```
 0                 page_start                     page_end                    total_bytes
 | pool pages (pre) | this rank's allocation         | pool pages (post)          |
                    ^ lead ^ resident own ^ trail ^  (host-offloaded own, peers' tails)
```

* The rank's own allocation spans the pages that hold its resident experts ``[start,
  resident_stop)``; its tensor starts ``data_offset`` bytes into it, so mapping the allocation a
  second time at ``base + page_start`` puts own expert ``e`` at ``base + e * expert_bytes``
  without a copy. With ``host_experts`` H > 0 (offload) the last H experts of the own slice,
  ``[resident_stop, stop)``, are not resident: like peer experts they lie on pool pages (or in
  the trailing edge) and are copied from the node's host store.
* The bytes of that allocation outside its resident experts (the leading and trailing edges)
  belong to neighbouring experts. Weights are constant, so they are filled once at the exchange
  (``edge_copies``) and are shared by both buffers.
* Everything else is pool-backed (one pool per ping-pong buffer) and refilled by the prefetch
  (``prefetch_copies``); copies never write into the own allocation.

What is copied is described by ``tiers.SourceRange``s (``tiers.source_ranges``: global experts
``[first, first + count)`` read from a peer's memory or the host store). A ``CompositeCopy``
is the part of one such range that lands on pool pages (or edges): ``dst_offset`` inside the
composite range, ``src_offset`` counted from the range's first expert in its source memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:
    from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout
    from tensorrt_llm_dwdp.dwdp.tiers import SourceRange

Region = tuple[int, int]  # [lo, hi) bytes of a composite range


@dataclass(frozen=True)
class CompositeCopy:
    """``nbytes`` from byte ``src_offset`` of ``source`` (counted from its first expert, global
    expert ``source.first``) to byte ``dst_offset`` of the composite range."""

    dst_offset: int
    source: "SourceRange"
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

    Build with ``CompositeRange.of(layout, expert_bytes, page_bytes, host_experts)``; all
    offsets are bytes.
    """

    expert_bytes: int
    num_experts: int
    start: int          # first own expert
    stop: int           # one past the last own expert
    page_bytes: int
    host_experts: int = 0  # own experts [stop - host_experts, stop) live in the host store
    page_start: int = field(init=False)
    page_end: int = field(init=False)
    total_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        if self.expert_bytes <= 0:
            raise ValueError(f"expert_bytes must be positive, got {self.expert_bytes}")
        if not 0 <= self.start < self.stop <= self.num_experts:
            raise ValueError(f"own experts [{self.start}, {self.stop}) outside "
                             f"[0, {self.num_experts})")
        if not 0 <= self.host_experts < self.stop - self.start:
            raise ValueError(f"host_experts {self.host_experts} outside [0, "
                             f"{self.stop - self.start}): at least one own expert is resident")
        check_page_bytes(self.page_bytes, 1)
        eb, page = self.expert_bytes, self.page_bytes
        object.__setattr__(self, "page_start", align_down(self.start * eb, page))
        object.__setattr__(self, "page_end", align_up(self.resident_stop * eb, page))
        object.__setattr__(self, "total_bytes", align_up(self.num_experts * eb, page))

    @classmethod
    def of(cls, layout: "ExpertLayout", expert_bytes: int, page_bytes: int,
           host_experts: int = 0) -> "CompositeRange":
        start, stop = layout.owned_range()
        return cls(expert_bytes, layout.num_experts, start, stop, page_bytes, host_experts)

    # ------------------------------------------------------------------ regions
    @property
    def resident_stop(self) -> int:
        """One past the last own expert held in the own allocation."""
        return self.stop - self.host_experts

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
        """Size of the own allocation: the pages that hold the resident own experts."""
        return self.page_end - self.page_start

    @property
    def pool_regions(self) -> tuple[Region, ...]:
        """Pool-backed ``[lo, hi)`` byte ranges of the composite (pre, post; empty ones left out)."""
        return tuple(r for r in ((0, self.page_start), (self.page_end, self.total_bytes))
                     if r[1] > r[0])

    @property
    def pool_bytes(self) -> int:
        return sum(hi - lo for lo, hi in self.pool_regions)

    @property
    def edges(self) -> tuple[Region, ...]:
        """Bytes of other experts inside the own allocation (filled once at the exchange)."""
        lead = (self.page_start, self.start * self.expert_bytes)
        trail = (self.resident_stop * self.expert_bytes, min(self.page_end, self.tensor_bytes))
        return tuple(r for r in (lead, trail) if r[1] > r[0])

    @property
    def edge_bytes(self) -> int:
        return sum(hi - lo for lo, hi in self.edges)

    # ------------------------------------------------------------------ copies
    def pieces(self, first: int, count: int, regions: Iterable[Region]
               ) -> list[tuple[int, int, int]]:
        """``(dst_offset, offset from expert first, nbytes)``: the parts of global experts
        ``[first, first + count)`` that lie in ``regions``."""
        eb = self.expert_bytes
        lo, hi = first * eb, (first + count) * eb
        out = []
        for r_lo, r_hi in regions:
            a, b = max(lo, r_lo), min(hi, r_hi)
            if b > a:
                out.append((a, a - lo, b - a))
        return out

    def _copies(self, sources: Sequence["SourceRange"], regions) -> list[CompositeCopy]:
        return [CompositeCopy(dst, r, off, n) for r in sources
                for dst, off, n in self.pieces(r.first, r.count, regions)]

    def prefetch_copies(self, sources: Sequence["SourceRange"]) -> list[CompositeCopy]:
        """What one prefetch of this tensor copies: the bytes of ``sources``
        (``tiers.source_ranges``) that lie on pool pages, in their order."""
        return self._copies(sources, self.pool_regions)

    def edge_copies(self, sources: Sequence["SourceRange"]) -> list[CompositeCopy]:
        """What the exchange copies once into the own allocation's edges."""
        return self._copies(sources, self.edges)


@dataclass(frozen=True)
class CompositeFootprint:
    """Memory of the composite views of one rank against the multi-B view (bytes)."""

    own_bytes: int          # own allocations (resident experts + edges)
    pool_bytes: int         # both pools together
    reserved_bytes: int     # virtual address space of every (layer, buffer) range
    multi_own_bytes: int    # the same resident experts as plain tensors
    multi_buffer_bytes: int  # the multi-B prefetch buffers (peer slots and own host experts)

    @property
    def overhead_bytes(self) -> int:
        return self.own_bytes + self.pool_bytes - self.multi_own_bytes - self.multi_buffer_bytes


def footprint(layout: "ExpertLayout", layers: list[dict[str, int]], page_bytes: int,
              num_buffers: int = 2, host_experts: int = 0) -> CompositeFootprint:
    """The composite views' memory for ``layers`` (per layer ``{name: expert_bytes}``) with pages
    of ``page_bytes`` and ``host_experts`` own experts offloaded; pools are shared by all layers
    of one buffer, so each is as large as the largest layer's pool-backed bytes."""
    own = pool = reserved = multi_own = 0
    fetched = layout.num_experts - layout.num_experts_per_worker + host_experts
    largest_multi = 0
    for names in layers:
        layer_pool = layer_multi = 0
        for eb in names.values():
            r = CompositeRange.of(layout, eb, page_bytes, host_experts)
            own += r.allocation_bytes
            layer_pool += r.pool_bytes
            reserved += num_buffers * r.total_bytes
            multi_own += (layout.num_experts_per_worker - host_experts) * eb
            layer_multi += fetched * eb
        pool = max(pool, layer_pool)
        largest_multi = max(largest_multi, layer_multi)
    return CompositeFootprint(own, num_buffers * pool, reserved, multi_own,
                              num_buffers * largest_multi)
