"""Composite layout arithmetic: every fetched byte is copied exactly once, into pool pages by the
prefetch or into the own allocation's edges at the exchange, from the right peer byte; the own
allocation holds the own experts at the right offset; sweeps layouts and sizes around pages."""
import itertools

import pytest

from tensorrt_llm_dwdp.dwdp.composite_layout import (CompositeRange, align_up, check_page_bytes,
                                                     footprint)
from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout

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
        pre = r.prefetch_copies(lay)
        edge = r.edge_copies(lay)
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
            lo, hi = lay.fetch_range(c.peer)
            assert lo * eb <= c.dst_offset and c.dst_offset + c.nbytes <= hi * eb, c
            assert c.src_offset == c.dst_offset - p * c.peer * eb
            assert 0 <= c.src_offset and c.src_offset + c.nbytes <= w * eb


def test_peer_order_orders_prefetch_copies():
    lay = ExpertLayout(12, 4, 3, 3, 1)
    r = CompositeRange.of(lay, PAGE + 8, PAGE)
    assert [c.peer for c in r.prefetch_copies(lay, [2, 3, 0])] == [2, 3, 0]


def test_aligned_slices_have_no_edges():
    lay = ExpertLayout(8, 2, 4, 4, 1)
    r = CompositeRange.of(lay, PAGE, PAGE)
    assert r.edges == () and r.data_offset == 0 and r.allocation_bytes == 4 * PAGE
    assert r.pool_regions == ((0, 4 * PAGE),)


def test_tiny_experts_are_all_edge():
    lay = ExpertLayout(8, 2, 5, 3, 0)
    r = CompositeRange.of(lay, 4, PAGE)  # 32 bytes in all: one page, own allocation only
    assert r.prefetch_copies(lay) == [] and r.pool_bytes == 0
    assert [(c.dst_offset, c.nbytes) for c in r.edge_copies(lay)] == [(20, 12)]


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
