"""Composite expert views: every registered layer as one ``[E, ...]`` tensor per parameter.

For each layer position and ping-pong buffer b, each registered tensor gets one reserved virtual
range laid out by ``CompositeRange``: pool pages of buffer b, then this rank's own allocation
mapped a second time (no copy), then pool pages of buffer b. One ``set_access`` covers the whole
range. Layers that use buffer b share its pool pages (only one of them occupies b at a time), so
physical memory is the own slice plus two pools, as with the multi-tensor buffers; the k % 2
buffer rule can put one layer in either buffer, hence a range per (layer, buffer).

The copy plans keep the shape the copy engines run, ``(dst, src, nbytes)``: ``place(pos, b)``
puts the source ranges' bytes (``tiers.source_ranges``: peers, the host store, the rank's own
host-offloaded experts) on pool pages only; the own allocation's edge bytes (other experts
sharing its first and last page) are placed by ``edge_place`` and copied once at the exchange by
``copy_edges`` (weights are constant). Views are invalid after ``close()``.
"""
from __future__ import annotations

import logging
from typing import Callable, Mapping, Sequence

import torch

from tensorrt_llm_dwdp.dwdp.composite_layout import CompositeRange
from tensorrt_llm_dwdp.dwdp.copy_plan import Copy
from tensorrt_llm_dwdp.dwdp.errors import DwdpRegistrationError
from tensorrt_llm_dwdp.dwdp.tiers import Place, TierLayout
from tensorrt_llm_dwdp.dwdp.vmm import CpuVmm, GpuVmm, Memory

logger = logging.getLogger(__name__)

NUM_BUFFERS = 2
Locate = Callable[[torch.Tensor], tuple[Memory, int]]


def expert_bytes(t: torch.Tensor) -> int:
    return t[0].numel() * t.element_size() if t.shape[0] else 0


class _Pool:
    """Physical pages of one buffer. GPU: one allocation per page (mapped whole); CPU: one memfd
    whose page-aligned pieces are mapped."""

    def __init__(self, vmm: CpuVmm | GpuVmm, nbytes: int, page: int) -> None:
        self.chunk = nbytes if isinstance(vmm, CpuVmm) else page
        self.mems: list[Memory] = []
        count = (1 if nbytes else 0) if isinstance(vmm, CpuVmm) else nbytes // page
        try:
            for _ in range(count):
                self.mems.append(vmm.create(self.chunk, shareable=False))
        except BaseException:
            for mem in self.mems:
                vmm.release(mem)
            raise

    def map(self, vmm: CpuVmm | GpuVmm, addr: int, first: int, nbytes: int,
            mapped: list[tuple[int, int]]) -> None:
        """Map pool bytes ``[first, first + nbytes)`` at ``addr``; record each mapping."""
        while nbytes:
            index, offset = divmod(first, self.chunk)
            n = min(nbytes, self.chunk - offset)
            vmm.map(addr, self.mems[index], offset, n)
            mapped.append((addr, n))
            addr, first, nbytes = addr + n, first + n, nbytes - n


class CompositeViews:
    """Composite ranges of every (layer position, buffer, tensor) of one rank.

    ``tiers``: the rank's layout and how many own experts are offloaded; ``own[pos]``: the
    registered (resident) tensors of position ``pos``; ``locate(t)``: the allocation holding
    ``t`` and ``t``'s offset in it (the transport's); ``page_bytes``: mapping unit.
    """

    def __init__(self, vmm: CpuVmm | GpuVmm, tiers: TierLayout,
                 own: Sequence[Mapping[str, torch.Tensor]], locate: Locate,
                 page_bytes: int) -> None:
        self.vmm = vmm
        self.tiers = tiers
        self.layout = tiers.layout
        self.page_bytes = page_bytes
        self.ranges = [{name: CompositeRange.of(self.layout, expert_bytes(t), page_bytes,
                                                tiers.host_experts)
                        for name, t in tensors.items()} for tensors in own]
        self.pool_bytes = max(sum(r.pool_bytes for r in rs.values()) for rs in self.ranges)
        self._reserved: list[tuple[int, int, list[tuple[int, int]]]] = []
        self._pools: list[_Pool] = []
        self._flat: list[torch.Tensor] = []
        # bases[pos][b][name]: address of expert 0; views[pos][b][name]: the [E, ...] tensor
        self.bases: list[list[dict[str, int]]] = []
        self.views: list[list[dict[str, torch.Tensor]]] = []
        try:
            for _ in range(NUM_BUFFERS):
                self._pools.append(_Pool(vmm, self.pool_bytes, page_bytes))
                self._flat.append(self._map_flat(self._pools[-1]))
            for pos, tensors in enumerate(own):
                bases, views = [], []
                for b in range(NUM_BUFFERS):
                    per_name_base, per_name_view, cursor = {}, {}, 0
                    for name, t in tensors.items():
                        base, cursor = self._build(pos, b, name, t, locate, cursor)
                        per_name_base[name] = base
                        per_name_view[name] = self._tensor(base, t)
                    bases.append(per_name_base)
                    views.append(per_name_view)
                self.bases.append(bases)
                self.views.append(views)
        except BaseException:
            self.close()
            raise
        logger.debug("composite views: %d position(s), pools 2 x %d bytes, pages of %d",
                     len(own), self.pool_bytes, page_bytes)

    # ------------------------------------------------------------------ building
    def _map_flat(self, pool: _Pool) -> torch.Tensor:
        """All of a pool's pages in one range (poisoning, inspection)."""
        if not self.pool_bytes:
            return self.vmm.tensor(0, 0)
        base = self.vmm.reserve(self.pool_bytes)
        mapped: list[tuple[int, int]] = []
        self._reserved.append((base, self.pool_bytes, mapped))
        pool.map(self.vmm, base, 0, self.pool_bytes, mapped)
        self.vmm.set_access(base, self.pool_bytes)
        return self.vmm.tensor(base, self.pool_bytes)

    def _build(self, pos: int, b: int, name: str, t: torch.Tensor, locate: Locate,
               cursor: int) -> tuple[int, int]:
        r = self.ranges[pos][name]
        mem, offset = locate(t)
        if offset != r.data_offset or mem.size != r.allocation_bytes:
            raise DwdpRegistrationError(
                f"layer position {pos} tensor {name!r}: its allocation ({mem.size} bytes, tensor "
                f"at byte {offset}) does not match the composite layout ({r.allocation_bytes} "
                f"bytes, tensor at byte {r.data_offset}); allocate it with "
                "DwdpManager.allocate(shape, dtype) under expert_view composite")
        base = self.vmm.reserve(r.total_bytes)
        mapped: list[tuple[int, int]] = []
        self._reserved.append((base, r.total_bytes, mapped))
        pool = self._pools[b]
        if r.page_start:
            pool.map(self.vmm, base, cursor, r.page_start, mapped)
            cursor += r.page_start
        self.vmm.map(base + r.page_start, mem, 0, mem.size)
        mapped.append((base + r.page_start, mem.size))
        post = r.total_bytes - r.page_end
        if post:
            pool.map(self.vmm, base + r.page_end, cursor, post, mapped)
            cursor += post
        self.vmm.set_access(base, r.total_bytes)
        return base, cursor

    def _tensor(self, base: int, t: torch.Tensor) -> torch.Tensor:
        n = self.layout.num_experts
        raw = self.vmm.tensor(base, n * expert_bytes(t))
        return raw.view(t.dtype).view((n,) + tuple(t.shape[1:]))

    # ------------------------------------------------------------------ what callers use
    def view(self, pos: int, b: int) -> dict[str, torch.Tensor]:
        return self.views[pos][b]

    def multi_view(self, pos: int, b: int) -> dict[str, list[torch.Tensor]]:
        """The composite cut into the multi-tensor view (one slice per ``view_slots`` entry:
        S by rank, S + 1 with host experts; no copy)."""
        slots = self.tiers.view_slots()
        return {name: [t[first:first + n] for _, first, n in slots]
                for name, t in self.views[pos][b].items()}

    def place(self, pos: int, b: int) -> Place:
        """Where the prefetch of position ``pos`` into buffer ``b`` lands: pool pages only."""
        return self._placer(pos, b, lambda cr: cr.pool_regions)

    def edge_place(self, pos: int) -> Place:
        """Where the exchange's one-time copies of position ``pos`` land: the own allocation's
        edges (both buffers map the same allocation)."""
        return self._placer(pos, 0, lambda cr: cr.edges)

    def _placer(self, pos: int, b: int, regions: Callable[[CompositeRange], tuple]) -> Place:
        def put(r, name: str, eb: int) -> list[tuple[int, int, int]]:
            cr, base = self.ranges[pos][name], self.bases[pos][b][name]
            return [(base + dst, off, n) for dst, off, n in cr.pieces(r.first, r.count,
                                                                      regions(cr))]
        return put

    def copy_edges(self, copies: Sequence[Copy]) -> int:
        """Run the edge copies (``edge_place``) now, synchronously; returns the bytes copied."""
        for dst, src, n in copies:
            self.vmm.copy(dst, src, n)
        self.vmm.synchronize()
        return sum(n for _, _, n in copies)

    @property
    def buffer_bytes(self) -> int:
        """Physical bytes beyond the resident own experts: both pools, plus the own allocations'
        edges and page rounding (other experts' bytes kept there)."""
        res = self.tiers.resident_experts
        extra = sum(r.allocation_bytes - res * r.expert_bytes
                    for ranges in self.ranges for r in ranges.values())
        return NUM_BUFFERS * self.pool_bytes + extra

    def fill_(self, byte: int) -> None:
        """Fill both pools with ``byte`` (edges and own experts are untouched)."""
        for flat in self._flat:
            if flat.numel():
                self.vmm.fill(flat.data_ptr(), flat.numel(), byte)
        self.vmm.synchronize()

    def close(self) -> None:
        """Unmap every range and release the pools (idempotent; views are invalid after)."""
        errors = []
        self.views, self.bases, self._flat = [], [], []
        if self._reserved:
            self.vmm.synchronize()  # no copy or kernel may still touch a range
        for base, size, mapped in reversed(self._reserved):
            for addr, n in mapped:
                try:
                    self.vmm.unmap(addr, n)
                except Exception as exc:
                    errors.append(exc)
            try:
                self.vmm.free(base, size)
            except Exception as exc:
                errors.append(exc)
        self._reserved.clear()
        for pool in self._pools:
            for mem in pool.mems:
                try:
                    self.vmm.release(mem)
                except Exception as exc:
                    errors.append(exc)
        self._pools.clear()
        if errors:
            raise errors[0]
