"""tiers.py: which tier each expert range comes from, and copies that land every expert right.

The copy test simulates a group in one process: every rank's resident tensor, the host store
and this rank's buffers (multi-view slots, or composite ranges of 16-byte pages) are numpy
arrays at real addresses, every (tensor, expert) carries a unique byte ramp, buffers start
poisoned, and the copies run with memmove. Every layout of a small grid, every set of down peers
and several host-expert counts are checked expert by expert in both views.
"""
import ctypes
import itertools

import numpy as np
import pytest

from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout
from tensorrt_llm_dwdp.dwdp.composite_layout import CompositeRange
from tensorrt_llm_dwdp.dwdp.tiers import (HOST, HOST_LINK, OWN_HOST, PEER, SourceRange,
                                          TierLayout, slot_place, source_ranges, tier_copies,
                                          writer_range)

NAMES = {"a": 5, "b": 12}  # bytes per expert of two tensors (odd sizes: no lucky alignment)


def layouts(max_size=4, max_e=13):
    for s in range(2, max_size + 1):
        for w in range(1, max_e + 1):
            for p in range(1, w + 1):
                e = w + (s - 1) * p
                if e <= max_e:
                    for r in range(s):
                        yield ExpertLayout(e, s, w, p, r)


def ramp(name: str, expert: int, n: int) -> np.ndarray:
    key = (expert * 31 + len(name) * 7) % 251
    return ((np.arange(n, dtype=np.int64) * 13 + key) % 251).astype(np.uint8)


def test_view_slots_cover_all_experts_once_in_order():
    for lay in layouts():
        for h in range(lay.num_experts_per_worker):
            tl = TierLayout(lay, h)
            slots = tl.view_slots()
            firsts = [f for _, f, _ in slots]
            assert firsts == list(tl.view_offsets)
            covered = [e for _, f, n in slots for e in range(f, f + n)]
            assert covered == list(range(lay.num_experts)), (lay, h)
            assert len(slots) == lay.dwdp_size + (1 if h else 0)
            own = [s for s in slots if s[0] is None][0]
            assert own[2] == tl.resident_experts == lay.num_experts_per_worker - h


def test_writer_ranges_partition_experts_inside_each_writers_slice():
    for lay in layouts():
        parts = [writer_range(lay, r) for r in range(lay.dwdp_size)]
        assert parts[0][0] == 0 and parts[-1][1] == lay.num_experts
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        for r, (lo, hi) in enumerate(parts):
            own_lo, own_hi = lay.owned_range(r)
            assert own_lo <= lo < hi <= own_hi


def test_source_ranges_pick_peer_where_resident_and_up_else_host():
    lay = ExpertLayout(16, 3, 6, 5, 0)  # rank 0 fetches the tails [6, 11) and [11, 16)
    assert source_ranges(TierLayout(lay)) == (
        SourceRange(1, 0, 6, 5, PEER, 1), SourceRange(2, 0, 11, 5, PEER, 2))
    assert source_ranges(TierLayout(lay), down={1}) == (
        SourceRange(1, 0, 6, 5, HOST, -1), SourceRange(2, 0, 11, 5, PEER, 2))
    # H = 3: rank p keeps [5p, 5p + 3) resident; rank 1's [8, 11) and rank 2's [13, 16) are host
    tl = TierLayout(lay, 3)
    assert source_ranges(tl) == (
        SourceRange(1, 0, 6, 2, PEER, 1), SourceRange(1, 2, 8, 3, HOST, -1),
        SourceRange(2, 0, 11, 2, PEER, 2), SourceRange(2, 2, 13, 3, HOST, -1),
        SourceRange(OWN_HOST, 0, 3, 3, HOST, -1))
    assert source_ranges(tl, own_host_copied=False)[-1].slot == 2
    assert all(r.link == HOST_LINK for r in source_ranges(tl, down={1, 2}))


def test_bad_host_experts():
    lay = ExpertLayout(8, 2, 4, 4, 0)
    for h in (-1, 4, 5, True):
        with pytest.raises(ValueError, match="host_experts"):
            TierLayout(lay, h)


class Memory:
    """numpy arrays at fixed addresses; keeps them alive."""

    def __init__(self):
        self.arrays = []

    def array(self, nbytes: int, fill: int = 0) -> tuple[np.ndarray, int]:
        a = np.full(max(nbytes, 1), fill, dtype=np.uint8)
        self.arrays.append(a)
        return a, a.ctypes.data


def simulate(lay: ExpertLayout, h: int, down: set[int], view: str = "multi",
             page: int = 16) -> None:
    """Run one layer's copies into poisoned buffers of ``view`` and check every expert.

    ``composite``: per name one range of ``CompositeRange.total_bytes`` whose own allocation
    (``page`` bytes per page) holds the resident own experts at ``data_offset`` and poison
    elsewhere; the edge copies (the exchange's) then the pool copies (the prefetch's) must make
    it experts [0, E) byte for byte."""
    tl = TierLayout(lay, h)
    mem = Memory()
    e, p = lay.num_experts, lay.num_prefetch_experts
    # each rank's resident tensor (byte 0 = global expert P * rank), and the host store
    peer_base, host_base = {}, {}
    for name, eb in NAMES.items():
        store, host_base[name] = mem.array(e * eb)
        for g in range(e):
            store[g * eb:(g + 1) * eb] = ramp(name, g, eb)
        for peer in lay.peers:
            n = tl.resident_experts
            t, peer_base[(peer, name)] = mem.array(n * eb, fill=0xEE)
            first = p * peer
            for k in range(n):
                t[k * eb:(k + 1) * eb] = ramp(name, first + k, eb)
    links = [*lay.peers, HOST_LINK]
    ranges = source_ranges(tl, down)

    def run(place):
        per_link = tier_copies(lay, ranges, NAMES, place, lambda peer, name: peer_base[(peer, name)],
                               lambda name: host_base[name], links)
        for copies in per_link:
            for dst, src, n in copies:
                ctypes.memmove(dst, src, n)

    if view == "composite":
        comp = {}
        start = lay.owned_range()[0]
        for name, eb in NAMES.items():
            r = CompositeRange.of(lay, eb, page, h)
            a, base = mem.array(r.total_bytes, fill=0xA5)
            for k in range(tl.resident_experts):
                a[(start + k) * eb:(start + k + 1) * eb] = ramp(name, start + k, eb)
            comp[name] = (r, a, base)

        def placer(regions):
            return lambda rng, name, eb: [
                (comp[name][2] + d, o, n)
                for d, o, n in comp[name][0].pieces(rng.first, rng.count, regions(comp[name][0]))]

        run(placer(lambda r: r.edges))
        run(placer(lambda r: r.pool_regions))
        for name, eb in NAMES.items():
            r, a, _ = comp[name]
            for g in range(e):
                assert np.array_equal(a[g * eb:(g + 1) * eb], ramp(name, g, eb)), \
                    (lay, h, down, name, g)
            assert (a[r.tensor_bytes:] == 0xA5).all()  # padding: never written
        return
    # poisoned buffers: one per slot and name, sized by the slot's experts
    slots = [(s, f, n) for s, f, n in tl.view_slots() if s is not None]
    buffers = {(s, name): mem.array(n * eb, fill=0xA5) for s, f, n in slots
               for name, eb in NAMES.items()}
    run(slot_place(lambda slot, name: buffers[(slot, name)][1]))
    for s, f, n in slots:
        for name, eb in NAMES.items():
            buf = buffers[(s, name)][0]
            for k in range(n):
                got = buf[k * eb:(k + 1) * eb]
                assert np.array_equal(got, ramp(name, f + k, eb)), (lay, h, down, s, name, k)
    # no range reads a down peer's memory or a host-only expert from a peer
    for r in ranges:
        if r.tier == PEER:
            assert r.rank not in down
            lo, hi = tl.resident_range(r.rank)
            assert lo <= r.first and r.first + r.count <= hi


@pytest.mark.parametrize("size", [2, 3, 4])
def test_copies_land_every_expert_from_its_tier(size):
    checked = 0
    for lay in layouts(max_size=size, max_e=11):
        if lay.dwdp_size != size:
            continue
        for h in sorted({h for h in (0, 1, lay.num_experts_per_worker - 1)
                         if h < lay.num_experts_per_worker}):
            for k in range(len(lay.peers) + 1):
                for down in itertools.combinations(lay.peers, k):
                    for view in ("multi", "composite"):
                        simulate(lay, h, set(down), view)
                    checked += 1
    assert checked > 20
