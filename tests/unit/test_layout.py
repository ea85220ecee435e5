"""ExpertLayout properties over thousands of (E, S, W, P, r)."""
import random

import pytest
import torch

from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout


def _all_layouts():
    rng = random.Random(1234)
    seen = set()
    for s in range(1, 9):
        for p in range(1, 9):
            for w in range(p, p + 9):
                seen.add((w + (s - 1) * p, s, w, p))
    while len(seen) < 3000:
        s = rng.randint(2, 12)
        p = rng.randint(1, 24)
        w = rng.randint(p, p + 40)
        seen.add((w + (s - 1) * p, s, w, p))
    seen.add((256, 2, 128, 128))
    seen.add((256, 4, 64, 64))
    seen.add((256, 4, 100, 52))
    for e, s, w, p in sorted(seen):
        for r in range(s):
            yield e, s, w, p, r


def _check(lay: ExpertLayout) -> None:
    e, s, w, p, r = (lay.num_experts, lay.dwdp_size, lay.num_experts_per_worker,
                     lay.num_prefetch_experts, lay.rank)
    # The view tensors, concatenated in rank order, are exactly [0, E).
    flat = []
    for t in range(s):
        lo, size = lay.tensor_offsets[t], lay.tensor_sizes[t]
        if t == r:
            assert (lo, lo + size) == lay.owned_range() == (p * r, p * r + w)
        else:
            src_lo, src_hi = lay.source_slice(t)
            owner_lo, owner_hi = lay.owned_range(t)
            assert src_hi - src_lo == p and 0 <= src_lo and src_hi <= w
            # The fetched experts really are the peer's: head of lower, tail of higher.
            assert (owner_lo + src_lo, owner_lo + src_hi) == lay.fetch_range(t)
            assert (lo, lo + size) == lay.fetch_range(t)
            assert src_lo == (0 if t < r else w - p)
            assert owner_lo <= lo and lo + size <= owner_hi
        flat.extend(range(lo, lo + size))
    assert flat == list(range(e))
    assert sum(lay.tensor_sizes) == e
    # locate is the inverse of (tensor, local) -> offset + local, every expert exactly once.
    hits = {}
    for g in range(e):
        t, i = lay.locate(g)
        assert 0 <= i < lay.tensor_sizes[t]
        assert lay.tensor_offsets[t] + i == g
        hits[(t, i)] = g
    assert len(hits) == e
    assert lay.expert_memory(3) == 3 * w + 2 * (s - 1) * p


def test_layout_properties_exhaustive():
    n = 0
    for e, s, w, p, r in _all_layouts():
        _check(ExpertLayout(e, s, w, p, r))
        n += 1
    assert n > 3000


def test_disjoint_partition_example():
    lay = ExpertLayout(256, 4, 64, 64, 2)
    assert lay.tensor_offsets == (0, 64, 128, 192)
    assert lay.tensor_sizes == (64, 64, 64, 64)
    assert lay.source_starts == (0, 0, 0, 0)
    assert lay.peers == (0, 1, 3)


def test_redundant_example():
    lay = ExpertLayout(256, 4, 100, 52, 1)
    assert lay.owned_range() == (52, 152)
    assert lay.fetch_range(0) == (0, 52)       # head of rank 0
    assert lay.fetch_range(2) == (152, 204)    # tail of rank 2 ([104, 204))
    assert lay.fetch_range(3) == (204, 256)    # tail of rank 3 ([156, 256))
    assert lay.source_slice(2) == (48, 100)
    assert lay.locate(151) == (1, 99)
    assert lay.locate(152) == (2, 0)


def test_single_rank_is_identity():
    lay = ExpertLayout(8, 1, 8, 0, 0)
    assert lay.tensor_sizes == (8,)
    assert [lay.locate(g) for g in range(8)] == [(0, g) for g in range(8)]
    assert lay.buffered_experts == 0


def test_from_config_and_map_tensors():
    cfg = DwdpConfig(dwdp_size=2, num_experts_per_worker=5, num_prefetch_experts=3)
    lay = ExpertLayout.from_config(cfg, 8, 1)
    tens, local = lay.map_tensors()
    assert tens.dtype == torch.int32 and tens.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert local.tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    off = ExpertLayout.from_config(DwdpConfig(), 16, 0)
    assert off.tensor_sizes == (16,)


@pytest.mark.parametrize("args, words", [
    ((10, 2, 5, 3, 0), "!= E = 10"),
    ((8, 2, 3, 5, 0), "exceeds"),
    ((8, 2, 5, 3, 2), "rank 2 outside [0, 2)"),
    ((8, 2, 5, 3, -1), "rank -1"),
    ((8, 0, 5, 3, 0), "dwdp_size"),
    ((8, 2, 8, 0, 0), "num_prefetch_experts"),
    ((0, 1, 0, 0, 0), "num_experts"),
])
def test_bad_layout_raises(args, words):
    with pytest.raises(ValueError) as info:
        ExpertLayout(*args)
    assert words in str(info.value)


def test_bad_queries():
    lay = ExpertLayout(8, 2, 5, 3, 0)
    with pytest.raises(IndexError, match="expert 8 outside"):
        lay.locate(8)
    with pytest.raises(ValueError, match="from itself"):
        lay.fetch_range(0)
    with pytest.raises(ValueError, match="peer rank 5"):
        lay.source_slice(5)
