"""Composite layout arithmetic: every fetched byte is copied exactly once, into pool pages by the
prefetch or into the own allocation's edges at the exchange, from the right peer byte (or the
host store, for offloaded own experts and down peers); the own allocation holds the resident own
experts at the right offset; sweeps layouts, host-expert counts and sizes around pages."""
import itertools

import pytest

from tensorrt_llm_dwdp.dwdp.composite_layout import (CompositeRange, align_up, check_page_bytes,
                                                     footprint)
from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout
from tensorrt_llm_dwdp.dwdp.tiers import HOST, PEER, TierLayout, source_ranges

PAGE = 4096
SIZES = [1, 4, 7, 70, PAGE // 3, PAGE - 1, PAGE, PAGE + 1, 2 * PAGE - 3, 3 * PAGE, 5000]
LAYOUTS = [(8, 2, 4, 4), (8, 2, 5, 3), (16, 2, 10, 6), (12, 4, 6, 2), (12, 4, 3, 3),
           (16, 8, 2, 2), (9, 3, 5, 2), (256, 2, 128, 128)]


def _intervals(copies):
    return sorted((c.dst_offset, c.dst_offset + c.nbytes) for c in copies)


def _merge(intervals):
    out = []
    for lo, hi in sorted(intervals):
        assert not out or lo >= out[-1][1], f"overlap at {lo}: {intervals}"
        if out and lo == out[-1][1]:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _sources(lay, h=0, down=()):
    return source_ranges(TierLayout(lay, h), down)


@pytest.mark.parametrize("e,s,w,p", LAYOUTS)
def test_every_fetched_byte_copied_once_from_its_owner(e, s, w, p):
    for rank, eb, page in itertools.product(range(s), SIZES, (PAGE, 4 * PAGE)):
        lay = ExpertLayout(e, s, w, p, rank)
        r = CompositeRange.of(lay, eb, page)
        start, stop = lay.owned_range()
        assert r.page_start % page == 0 and r.page_end % page == 0 and r.total_bytes % page == 0
        assert r.page_start + r.data_offset == start * eb
        assert r.data_offset + w * eb <= r.allocation_bytes
        assert r.total_bytes == align_up(e * eb, page) >= r.page_end
        pre = r.prefetch_copies(_sources(lay))
        edge = r.edge_copies(_sources(lay))
        # pool copies never write into the own allocation; edge copies only there
        for c in pre:
            assert c.dst_offset + c.nbytes <= r.page_start or c.dst_offset >= r.page_end, c
        for c in edge:
            assert r.page_start <= c.dst_offset and c.dst_offset + c.nbytes <= r.page_end, c
        # together they cover [0, E*eb) minus the own experts, each byte once
        want = [iv for iv in ((0, start * eb), (stop * eb, e * eb)) if iv[1] > iv[0]]
        assert _merge(_intervals(pre) + _intervals(edge)) == want, (rank, eb, page)
        assert sum(c.nbytes for c in pre) + r.edge_bytes == (e - w) * eb
        # each copy reads the same global bytes from the peer that fetches them to us
        for c in pre + edge:
            assert c.source.tier == PEER
            lo, hi = lay.fetch_range(c.source.rank)
            assert lo * eb <= c.dst_offset and c.dst_offset + c.nbytes <= hi * eb, c
            assert c.src_offset == c.dst_offset - c.source.first * eb
            peer_offset = c.dst_offset - p * c.source.rank * eb  # inside the peer's own tensor
            assert 0 <= peer_offset and peer_offset + c.nbytes <= w * eb


@pytest.mark.parametrize("e,s,w,p", [(8, 1, 8, 0), *LAYOUTS[:6]])
def test_offloaded_own_experts_come_from_the_host_store_onto_pool_pages(e, s, w, p):
    """With H own experts offloaded the own allocation holds only the W - H resident ones;
    the H lie on pool pages (or the trailing edge) and are read from the host store, as are
    the parts of peers' slices that they offload or that belong to a down peer."""
    for rank, eb, page in itertools.product(range(s), SIZES, (PAGE, 4 * PAGE)):
        lay = ExpertLayout(e, s, w, p, rank)
        for h in sorted({1, w // 4, 3 * w // 4, w - 1} - {0}):
            if h >= w:
                continue
            for down in ((), lay.peers[:1]):
                r = CompositeRange.of(lay, eb, page, h)
                start, stop = lay.owned_range()
                res = stop - h
                assert r.resident_stop == res and r.allocation_bytes == align_up(
                    res * eb, page) - r.page_start
                assert r.data_offset + (w - h) * eb <= r.allocation_bytes
                sources = _sources(lay, h, down)
                pre, edge = r.prefetch_copies(sources), r.edge_copies(sources)
                want = [iv for iv in ((0, start * eb), (res * eb, e * eb)) if iv[1] > iv[0]]
                assert _merge(_intervals(pre) + _intervals(edge)) == want, (rank, eb, page, h)
                for c in pre:
                    assert c.dst_offset + c.nbytes <= r.page_start or c.dst_offset >= r.page_end
                for c in pre + edge:
                    src = c.source
                    assert c.src_offset == c.dst_offset - src.first * eb
                    lo, hi = src.first * eb, (src.first + src.count) * eb
                    assert lo <= c.dst_offset and c.dst_offset + c.nbytes <= hi
                    if res * eb <= c.dst_offset < stop * eb:   # own host experts: host store
                        assert src.tier == HOST
                    if src.tier == PEER:
                        assert src.rank not in down
                        assert c.dst_offset + c.nbytes <= (p * src.rank + w - h) * eb
                host_own = sum(c.nbytes for c in pre + edge
                               if c.source.tier == HOST and c.dst_offset >= res * eb
                               and c.dst_offset < stop * eb)
                assert host_own == h * eb


def test_peer_order_orders_prefetch_copies():
    lay = ExpertLayout(12, 4, 3, 3, 1)
    r = CompositeRange.of(lay, PAGE + 8, PAGE)
    by_peer = {src.rank: src for src in _sources(lay)}
    got = r.prefetch_copies([by_peer[2], by_peer[3], by_peer[0]])
    assert [c.source.rank for c in got] == [2, 3, 0]


def test_aligned_slices_have_no_edges():
    lay = ExpertLayout(8, 2, 4, 4, 1)
    r = CompositeRange.of(lay, PAGE, PAGE)
    assert r.edges == () and r.data_offset == 0 and r.allocation_bytes == 4 * PAGE
    assert r.pool_regions == ((0, 4 * PAGE),)


def test_tiny_experts_are_all_edge():
    lay = ExpertLayout(8, 2, 5, 3, 0)
    r = CompositeRange.of(lay, 4, PAGE)  # 32 bytes in all: one page, own allocation only
    assert r.prefetch_copies(_sources(lay)) == [] and r.pool_bytes == 0
    assert [(c.dst_offset, c.nbytes) for c in r.edge_copies(_sources(lay))] == [(20, 12)]


def test_offload_needs_a_resident_expert():
    lay = ExpertLayout(8, 2, 5, 3, 0)
    with pytest.raises(ValueError, match="at least one own expert is resident"):
        CompositeRange.of(lay, PAGE, PAGE, 5)


@pytest.mark.parametrize("page,minimum", [(3000, 4096), (2048, 4096), (0, 4096), (6 * 4096, 4096),
                                          (1 << 20, 1 << 21)])
def test_unsupported_page_sizes_are_refused(page, minimum):
    with pytest.raises(ValueError, match="page"):
        check_page_bytes(page, minimum, "page")


def test_footprint_counts_edges_and_padding():
    lay = ExpertLayout(8, 2, 5, 3, 1)
    fp = footprint(lay, [{"a": PAGE + 1, "b": 4}] * 3, PAGE)
    assert fp.multi_own_bytes == 3 * 5 * (PAGE + 5)
    assert fp.multi_buffer_bytes == 2 * 3 * (PAGE + 5)
    r = CompositeRange.of(lay, PAGE + 1, PAGE)
    assert fp.own_bytes == 3 * (r.allocation_bytes + PAGE)   # "b": all 32 bytes in one page
    assert fp.pool_bytes == 2 * r.pool_bytes
    assert fp.overhead_bytes == fp.own_bytes + fp.pool_bytes - fp.multi_own_bytes \
        - fp.multi_buffer_bytes > 0


def test_footprint_with_offload_counts_resident_experts_only():
    lay = ExpertLayout(8, 2, 5, 3, 1)
    fp = footprint(lay, [{"a": PAGE}] * 2, PAGE, host_experts=2)
    assert fp.multi_own_bytes == 2 * 3 * PAGE and fp.own_bytes == 2 * 3 * PAGE
    assert fp.multi_buffer_bytes == 2 * (3 + 2) * PAGE == fp.pool_bytes  # peer + own host experts
    assert fp.overhead_bytes == 0
