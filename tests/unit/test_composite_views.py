"""Composite expert views on CPU, ranks as threads of one process (real memfd pages, real
descriptor passing, real copy threads).

The view of every layer must be, byte for byte and address for address, the tensor of one rank
holding all experts: expert e at ``base + e * expert_bytes``, with every expert's bytes a ramp
unique to (layer, tensor, expert), after the pools were poisoned, over several steps of an odd
layer count (a layer's buffer alternates), for per-expert sizes on and around page boundaries.
Sentinels: the range's padding past expert E-1 keeps the poison; the own slice is the own memory
mapped a second time (a write to it shows in both buffers' views). After close nothing of ours
is mapped or open, and bad input fails clearly, leaving nothing behind.
"""
import gc
import glob
import os

import pytest
import torch

from _thread_group import _in_threads
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig, DwdpConfigError
from tensorrt_llm_dwdp.dwdp.control import GROUP_PREFIX, SHM_DIR
from tensorrt_llm_dwdp.dwdp.errors import (DwdpMismatchError, DwdpPeerError,
                                           DwdpRegistrationError, DwdpStateError)
from tensorrt_llm_dwdp.dwdp.manager import DwdpManager

PAGE = 4096
POISON = 0xA5
LAYERS = (2, 5, 7)  # odd count
TENSORS = {  # name -> (dtype, per-expert shape): sizes on and around a page
    "w3_w1_weight": (torch.uint8, (PAGE,)),
    "w3_w1_weight_scale": (torch.uint8, (PAGE - 1,)),
    "fc31_alpha": (torch.float32, ()),
    "w2_weight": (torch.uint8, (PAGE + 1,)),
    "w2_weight_scale": (torch.bfloat16, (1365,)),
    "fc2_alpha": (torch.float32, (3, 1024)),
    "w2_bias": (torch.uint8, (7,)),
}


def ramp(layer: int, name_id: int, expert: int, n: int) -> torch.Tensor:
    key = (layer * 1009 + name_id * 101 + expert * 7) % 251
    return ((torch.arange(n, dtype=torch.int64) * 13 + key) % 251).to(torch.uint8)


def reference(layer: int, name_id: int, num_experts: int, n: int) -> torch.Tensor:
    """One rank holding all experts: row e is expert e's bytes."""
    return torch.stack([ramp(layer, name_id, e, n) for e in range(num_experts)])


def our_maps() -> list:
    gc.collect()  # tensors of earlier tests waiting for the collector drop their mappings first
    with open("/proc/self/maps") as f:
        return [line for line in f if "trtllm_dwdp" in line]


def left_mapped(before: list) -> list:
    """Our mappings now that were not there at ``before`` (another module's leftovers are)."""
    return [line for line in our_maps() if line not in before]


def open_fds() -> set:
    gc.collect()  # objects of earlier tests waiting for the collector close their fds first
    return set(os.listdir("/proc/self/fd"))


def filled(t: torch.Tensor, layer: int, name_id: int, first: int) -> torch.Tensor:
    """``t`` holding global experts ``[first, first + len(t))`` of (layer, tensor)."""
    raw = t.view(torch.uint8).view(t.shape[0], -1)
    raw.copy_(torch.stack([ramp(layer, name_id, first + i, raw.shape[1])
                           for i in range(t.shape[0])]))
    return t


def register(mgr: DwdpManager, layers=LAYERS) -> None:
    """Resident experts in ``allocate`` memory; with offload the last H of the slice as plain
    host tensors (they go to the host store)."""
    res, h = mgr.resident_experts, mgr.tier_layout.host_experts
    lo = mgr.layout.owned_range()[0]
    for layer in layers:
        own, host = {}, {}
        for name_id, (name, (dtype, tail)) in enumerate(TENSORS.items()):
            own[name] = filled(mgr.allocate((res,) + tail, dtype), layer, name_id, lo)
            if h:
                host[name] = filled(torch.empty((h,) + tail, dtype=dtype), layer, name_id,
                                    lo + res)
        mgr.register_layer(layer, own, host or None)


def config(size, w, p, **kw) -> DwdpConfig:
    return DwdpConfig(dwdp_size=size, num_experts_per_worker=w, num_prefetch_experts=p,
                      expert_view="composite", peer_timeout_s=20, prefetch_slice_bytes=3000, **kw)


def check_layer(mgr: DwdpManager, layer: int, num_experts: int) -> None:
    comp = mgr.composite_weights(layer)
    multi = mgr.weights(layer)
    start = mgr.layout.owned_range()[0]
    for name_id, name in enumerate(TENSORS):
        t = comp[name]
        eb = t[0].numel() * t.element_size()
        assert t.shape[0] == num_experts and t.is_contiguous()
        assert [t[e].data_ptr() - t.data_ptr() for e in range(num_experts)] == \
            [e * eb for e in range(num_experts)]
        assert multi[name][mgr.rank].data_ptr() == t[start].data_ptr()
        got = t.view(torch.uint8).view(num_experts, -1)
        want = reference(layer, name_id, num_experts, got.shape[1])
        bad = [e for e in range(num_experts) if not torch.equal(got[e], want[e])]
        assert not bad, f"rank {mgr.rank} layer {layer} {name}: experts {bad} differ"
        # padding past the last expert is pool memory the prefetch never writes: still poison
        r = mgr._composite.ranges[mgr.layer_indices.index(layer)][name]
        pad = r.total_bytes - r.tensor_bytes
        if pad and r.page_end < r.total_bytes:
            base = t.data_ptr() + r.tensor_bytes
            tail = mgr._transport.vmm.tensor(base, pad)
            assert bool((tail == POISON).all()), (layer, name)


def run_rank(rank, comm, size, w, p, steps=3, **kw):
    e = w + (size - 1) * p
    with DwdpManager(config(size, w, p, **kw), e, comm, "cpu") as mgr:
        register(mgr)
        mgr.exchange()
        mgr.poison_buffers(POISON)
        for _ in range(steps):
            mgr.start_step()
            for layer in LAYERS:
                check_layer(mgr, layer, e)
                mgr.done(layer)
        mgr.synchronize()
        comm.allgather(None, 20, "test: every rank's prefetches landed")
        # zero copy: the own slice in both buffers' views is the registered memory itself
        pos = mgr.layer_indices.index(LAYERS[0])
        own = mgr._own[pos]["w3_w1_weight"]
        views = [mgr._composite.view(pos, b)["w3_w1_weight"] for b in range(2)]
        start = mgr.layout.owned_range()[0]
        own[0, :4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
        assert all(v[start, :4].tolist() == [1, 2, 3, 4] for v in views)
        stats = mgr.stats
        key = mgr._host.key if mgr._host is not None else None
        del own, views
    if key is not None:  # the group's host store and control block are gone
        assert not glob.glob(f"{SHM_DIR}/{GROUP_PREFIX}{key}_*")
    return stats, prefetch_bytes(mgr)


def prefetch_bytes(mgr: DwdpManager) -> tuple[int, int]:
    """``(all, from the host store)``: bytes one prefetch of one layer moves (pure layout)."""
    from tensorrt_llm_dwdp.dwdp.composite_layout import CompositeRange
    from tensorrt_llm_dwdp.dwdp.tiers import HOST, source_ranges

    total = host = 0
    sources = source_ranges(mgr.tier_layout)
    for dtype, tail in TENSORS.values():
        eb = torch.empty((1,) + tail, dtype=dtype).nbytes
        r = CompositeRange.of(mgr.layout, eb, mgr.page_bytes, mgr.tier_layout.host_experts)
        for c in r.prefetch_copies(sources):
            total += c.nbytes
            host += c.nbytes if c.source.tier == HOST else 0
    return total, host


@pytest.mark.parametrize("size,w,p,h", [(2, 8, 8, 2), (2, 8, 8, 6), (3, 5, 3, 1), (1, 8, 0, 3)])
def test_offloaded_own_experts_come_from_the_host_store_onto_pool_pages(size, w, p, h):
    """Offload of 25% and 75% of W (and odd layouts, one rank): the composite equals one rank
    holding all experts, the host store supplies the own host experts (and the peer's) every
    prefetch, and nothing of the group is left in /dev/shm after close (``run_rank``)."""
    fds, maps = open_fds(), our_maps()

    out = _in_threads(size, lambda r, c: run_rank(r, c, size, w, p, host_experts_per_worker=h))
    for r in out:
        assert not isinstance(r, BaseException), repr(r)
    for st, (per_prefetch, per_prefetch_host) in out:
        assert per_prefetch_host > 0 and st.bytes_copied == st.prefetches * per_prefetch
        assert st.host_bytes_copied == st.prefetches * per_prefetch_host
    assert left_mapped(maps) == []
    assert open_fds() == fds


def test_uvm_read_through_is_refused_with_the_composite_view():
    with pytest.raises(DwdpConfigError, match="host_offload: uvm does not combine with "
                                              "expert_view: composite"):
        config(2, 4, 4, host_experts_per_worker=1, host_offload="uvm")
    config(2, 4, 4, host_offload="uvm")  # no host experts: nothing is read through


@pytest.mark.parametrize("size,w,p,page", [(2, 4, 4, PAGE), (2, 5, 3, PAGE), (2, 5, 3, 4 * PAGE),
                                           (4, 6, 2, PAGE), (3, 3, 3, 2 * PAGE)])
def test_views_equal_one_rank_holding_all_experts(size, w, p, page):
    fds, maps = open_fds(), our_maps()
    out = _in_threads(size, lambda r, c: run_rank(r, c, size, w, p, view_page_bytes=page))
    for r in out:
        assert not isinstance(r, BaseException), repr(r)
    assert all(st.bytes_copied == st.prefetches * per_prefetch > 0
               for st, (per_prefetch, _) in out)
    assert left_mapped(maps) == []
    assert open_fds() == fds


def test_contention_opt_and_one_rank():
    out = _in_threads(2, lambda r, c: run_rank(r, c, 2, 5, 3, contention_opt=True))
    assert all(not isinstance(r, BaseException) for r in out), out
    with DwdpManager(DwdpConfig(expert_view="composite"), 4, _single(), "cpu") as mgr:
        t = mgr.allocate((4, 3), torch.uint8)
        mgr.register_layer(0, {"w": t})
        mgr.exchange()
        mgr.start_step()
        assert mgr.composite_weights(0)["w"] is t
        mgr.done(0)


def _single():
    from tensorrt_llm_dwdp.comm.local import LocalComm

    return LocalComm()


def test_composite_weights_needs_the_composite_view():
    def body(rank, comm):
        cfg = DwdpConfig(dwdp_size=2, num_experts_per_worker=2, num_prefetch_experts=2,
                         peer_timeout_s=20, expert_view="multi")
        with DwdpManager(cfg, 4, comm, "cpu") as mgr:
            mgr.register_layer(0, {"w": mgr.allocate((2, 8), torch.uint8)})
            mgr.exchange()
            mgr.start_step()
            with pytest.raises(DwdpStateError, match="expert_view: composite"):
                mgr.composite_weights(0)
            return True

    assert _in_threads(2, body) == [True, True]


def test_unsupported_page_size_is_refused():
    for page, words in ((2048, "multiple of the device's mapping granularity 4096"),
                        (3 * PAGE, "power of two")):
        with pytest.raises(DwdpConfigError, match=words):
            DwdpManager(config(2, 2, 2, view_page_bytes=page), 4, _Closing(), "cpu")


class _Closing:
    rank, size, group_id = 0, 2, 0

    def close(self):
        pass


def test_bad_tensors_fail_registration_naming_the_tensor():
    maps = our_maps()

    def body(rank, comm):
        with DwdpManager(config(2, 2, 2), 4, comm, "cpu") as mgr:
            if rank == 0:
                with pytest.raises(DwdpRegistrationError, match="not in memory the composite"):
                    mgr.register_layer(0, {"w": torch.zeros(2, 8, dtype=torch.uint8)})
                whole = mgr.allocate((3, 8), torch.uint8)  # not [W, ...]: plain page-0 tensor
                with pytest.raises(DwdpRegistrationError, match="tensor 'w'.*not the one the"):
                    mgr.register_layer(0, {"w": whole[1:]})
            return True

    assert _in_threads(2, body) == [True, True]
    assert left_mapped(maps) == []


def test_mismatched_views_and_failed_handle_passing_fail_every_rank_cleanly():
    fds, maps = open_fds(), our_maps()

    def mixed(rank, comm):
        view = "composite" if rank == 1 else "multi"
        cfg = DwdpConfig(dwdp_size=2, num_experts_per_worker=2, num_prefetch_experts=2,
                         expert_view=view, peer_timeout_s=20)
        with DwdpManager(cfg, 4, comm, "cpu") as mgr:
            mgr.register_layer(0, {"w": mgr.allocate((2, 8), torch.uint8)})
            mgr.exchange()

    errors = _in_threads(2, mixed)
    for exc in errors:
        assert isinstance(exc, DwdpMismatchError), repr(exc)
        assert "dwdp_config.expert_view = 'composite' but rank 0 has 'multi'" in str(exc)

    def lost_server(rank, comm):
        with DwdpManager(config(2, 2, 2), 4, comm, "cpu") as mgr:
            register(mgr, layers=(0,))
            if rank == 1:
                mgr._transport.after_exchange()  # its descriptor server is gone
            mgr.exchange()

    errors = _in_threads(2, lost_server)
    for exc in errors:
        assert isinstance(exc, DwdpPeerError), repr(exc)
        assert "mapping peer memory failed on rank 0: FdPassingError" in str(exc)
        assert "network namespace" in str(exc)
    del errors, exc  # their tracebacks hold the ranks' frames (and tensors over our memory)
    assert left_mapped(maps) == []
    assert open_fds() == fds
