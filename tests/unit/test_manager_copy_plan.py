"""Copy plans (pure): per-peer order, slicing at boundaries, round-robin interleave coverage."""
import random

import pytest

from tensorrt_llm_dwdp.dwdp.copy_plan import interleaved_plan, peer_order, per_peer_plan, split


def _bytes_of(plan):
    """Every (dst byte -> src byte) pair the plan writes, as a dict; duplicates are errors."""
    out = {}
    for d, s, n in plan.copies():
        for i in range(n):
            assert d + i not in out, "a destination byte is written twice"
            out[d + i] = s + i
    return out


def test_split_boundaries():
    assert split((100, 1000, 10), 4) == [(100, 1000, 4), (104, 1004, 4), (108, 1008, 2)]
    assert split((0, 0, 8), 4) == [(0, 0, 4), (4, 4, 4)]
    assert split((0, 0, 3), 4) == [(0, 0, 3)]
    assert split((0, 0, 0), 4) == []
    with pytest.raises(ValueError, match="positive"):
        split((0, 0, 3), 0)


def test_per_peer_keeps_order_and_drops_empty():
    plan = per_peer_plan([[(1, 2, 3), (10, 20, 0)], [(5, 6, 7)]])
    assert plan.copies() == [(1, 2, 3), (5, 6, 7)] and plan.total_bytes == 10 and len(plan) == 2


def test_interleave_round_robin():
    a = [(0, 1000, 5), (100, 1100, 3)]
    b = [(200, 2000, 9)]
    plan = interleaved_plan([a, b], 4)
    assert plan.copies() == [
        (0, 1000, 4), (200, 2000, 4),
        (4, 1004, 1), (204, 2004, 4),
        (100, 1100, 3), (208, 2008, 1),
    ]


def test_interleave_covers_exactly_what_per_peer_covers():
    rng = random.Random(7)
    for _ in range(300):
        peers, cursor = [], 0
        for _p in range(rng.randint(1, 5)):
            copies = []
            for _n in range(rng.randint(1, 4)):
                n = rng.choice([0, 1, 15, 16, 17, 31, 32, 33, rng.randint(0, 200)])
                copies.append((cursor, 10**6 + cursor * 3, n))
                cursor += n + rng.randint(0, 3)
            peers.append(copies)
        sl = rng.choice([1, 3, 16, 32, 64])
        base = per_peer_plan(peers)
        inter = interleaved_plan(peers, sl)
        assert inter.total_bytes == base.total_bytes
        assert all(0 < n <= sl for n in inter.sizes)
        # Dst -> src must be the same affine map piecewise: compare the byte maps.
        assert _bytes_of(inter) == _bytes_of(base)


def test_peer_order_starts_after_self():
    assert peer_order(0, 4) == [1, 2, 3]
    assert peer_order(2, 4) == [3, 0, 1]
    assert peer_order(0, 1) == []
