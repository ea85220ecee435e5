"""host_store.py and control.py: store layout, fill, checksums that catch a flipped byte, the
control block's slots and records, the host-memory check before start-up, and no leftovers."""
import glob
import secrets

import pytest
import torch

from tensorrt_llm_dwdp.dwdp import host_store as hs
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig, DwdpConfigError
from tensorrt_llm_dwdp.dwdp.control import (CLOSED, SERVING, GroupControl, group_path,
                                            unlink_group)
from tensorrt_llm_dwdp.dwdp.errors import DwdpMismatchError
from tensorrt_llm_dwdp.dwdp.host_store import (PAGE, DwdpBackupError, HostStore, StoreLayout,
                                               store_bytes)
from tensorrt_llm_dwdp.dwdp.host_tiers import HostTiers, group_key, layer_specs_layout, store_layout
from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout
from tensorrt_llm_dwdp.dwdp.liveness import ProcIdentity


@pytest.fixture
def key():
    k = "test" + secrets.token_hex(6)
    yield k
    unlink_group(k)
    assert not glob.glob(group_path(k, "*")), "group files left behind"


def test_layout_regions_page_aligned_and_disjoint():
    lay = StoreLayout.of(10, [{"w": 7, "s": 3}, {"w": 5000}])
    regions = [(lay.region(pos, n)[0], 10 * eb) for pos, layer in enumerate(lay.layers)
               for n, eb in layer]
    assert [o % PAGE for o, _ in regions] == [0, 0, 0]
    assert all(a + n <= b for (a, n), (b, _) in zip(regions, regions[1:]))
    assert lay.total_bytes == regions[-1][0] + -(-50000 // PAGE) * PAGE
    assert store_bytes(10, 2, {"w": 7}) == 2 * PAGE
    with pytest.raises(KeyError, match="no tensor 'x'"):
        lay.region(0, "x")
    assert lay.fingerprint() == StoreLayout.of(10, [{"w": 7, "s": 3}, {"w": 5000}]).fingerprint()
    assert lay.fingerprint() != StoreLayout.of(10, [{"w": 7, "s": 4}, {"w": 5000}]).fingerprint()


def test_store_write_read_crc_and_corruption(key):
    lay = StoreLayout.of(6, [{"a": 3, "b": 8}, {"a": 3, "b": 8}])
    store = HostStore.create(key, lay)
    other = HostStore.open(key, lay)
    try:
        tensors = {"a": torch.arange(18, dtype=torch.uint8).view(6, 3),
                   "b": torch.arange(24, dtype=torch.int16).view(6, 4)}  # 8 bytes per expert
        store.write(1, 0, tensors)
        assert torch.equal(other.experts(1, "a", 2, 2).flatten(), torch.arange(6, 12, dtype=torch.uint8))
        crc = store.crc(1, 2, 5)
        store.verify([(1, 2, 5, crc)], "check")
        other.experts(1, "b", 4, 1)[0, 7] ^= 1  # one flipped bit, written through another mapping
        with pytest.raises(DwdpBackupError, match=r"layer position 1 experts \[2, 5\): CRC32"):
            store.verify([(1, 2, 5, crc)], "check")
        store.verify([(1, 0, 2, store.crc(1, 0, 2))], "untouched part")
        with pytest.raises(DwdpBackupError, match="never written"):
            store.verify([(0, 0, 3, None)], "check")
        with pytest.raises(DwdpBackupError, match="has .* bytes"):
            HostStore.open(key, StoreLayout.of(6, lay_as_dicts(lay) * 2))
    finally:
        store.close()
        other.close()


def lay_as_dicts(lay):
    return [dict(layer) for layer in lay.layers]


def test_not_enough_host_memory_names_the_numbers(monkeypatch):
    monkeypatch.setattr(hs, "host_memory", lambda path=hs.SHM_DIR: {"shm_free": 2 << 30,
                                                                    "mem_available": 64 << 30})
    with pytest.raises(DwdpConfigError, match=r"needs 3.00 GiB of POSIX shared memory but "
                                              r"/dev/shm has 2.00 GiB free"):
        hs.check_host_memory(3 << 30, "the store")
    monkeypatch.setattr(hs, "host_memory", lambda path=hs.SHM_DIR: {"shm_free": 64 << 30,
                                                                    "mem_available": 1 << 30})
    with pytest.raises(DwdpConfigError, match=r"needs 3.00 GiB of host memory but only 1.00 GiB"):
        hs.check_host_memory(3 << 30, "the store")
    hs.check_host_memory(1 << 20, "a small store")


def test_control_block_slots_crcs_records(key):
    ctl = GroupControl.create(key, 3, 2, 16, 4096, fingerprint=1234)
    peer = GroupControl.open(key)
    try:
        me = ProcIdentity.current()
        ctl.claim(1, me, 2, SERVING)
        assert peer.identity(1) == me and peer.incarnation(1) == 2 and peer.state(1) == SERVING
        assert peer.live_ranks() == [1]
        ctl.stamp(1, 99)
        ctl.declare_down(0, 1, 2)
        ctl.declare_down(2, 1, 2)
        assert peer.heartbeat(1) == 99 and peer.declared_down_by(1) == [0, 2]
        ctl.claim(1, me, 3, SERVING)  # a new incarnation is nobody's declared-down one
        assert peer.declared_down_by(1) == []
        ctl.declare_down(2, 1, 2)  # a late declaration about the old incarnation
        assert peer.declared_down_by(1) == []
        ctl.ack(0, 1, 3)
        assert peer.seen(0, 1) == 3 and peer.seen(0, 2) == 0
        assert peer.crc(1, 2) is None
        ctl.set_crc(1, 2, 0xFFFFFFFF)
        ctl.set_crc(0, 2, 0)
        assert peer.crc(1, 2) == 0xFFFFFFFF and peer.crc(0, 2) == 0
        ctl.post_record(1, 3, {"handles": [b"x" * 100]})
        assert peer.read_record(1, 3) == {"handles": [b"x" * 100]}
        ctl.set_state(1, CLOSED)
        assert peer.live_ranks() == []
        with pytest.raises(DwdpMismatchError, match="another expert layout"):
            peer.check_fingerprint(999, "rank 1")
    finally:
        ctl.close()
        peer.close()


def _tensors(w: int, first: int):
    return {"a": torch.stack([torch.full((3,), e, dtype=torch.uint8) for e in range(first, first + w)]),
            "b": torch.stack([torch.full((2,), 100 + e, dtype=torch.int16) for e in range(first, first + w)])}


def test_host_tiers_fill_verify_and_stale_files_replaced(key):
    config = DwdpConfig(dwdp_size=2, num_experts_per_worker=4, num_prefetch_experts=3,
                        host_experts_per_worker=1, host_backup=True)
    lay0, lay1 = ExpertLayout(7, 2, 4, 3, 0), ExpertLayout(7, 2, 4, 3, 1)
    slay = store_layout(7, [_tensors(3, 0)])
    assert slay == layer_specs_layout(7, [(5, {"a": ("torch.uint8", (3, 3)),
                                              "b": ("torch.int16", (3, 2))})])
    t0 = HostTiers.create(config, lay0, key, slay)
    t1 = HostTiers.open(config, lay1, key, slay)
    try:
        # rank 0 owns [0, 4): [0, 3) resident, expert 3 in host memory; writes part [0, 3)
        t0.fill(0, _tensors(3, 0), _tensors(1, 3), 0, 3)
        t1.fill(0, _tensors(3, 3), _tensors(1, 6), 3, 6)  # rank 1 owns [3, 7), writes [3, 7)
        for g in range(7):
            assert int(t1.store.experts(0, "a", g, 1)[0, 0]) == g
            assert t1.store.experts(0, "b", g, 1).view(torch.int16)[0, 0] == 100 + g
        t1.verify([(0, 7)], "all")
        t0.store.experts(0, "a", 5, 1)[0, 1] = 77
        t0.verify([(0, 3)], "rank 0's part is intact")
        with pytest.raises(DwdpBackupError, match=r"experts \[3, 7\)"):
            t0.verify([(4, 5)], "rank 1's part")
    finally:
        t0.close(0.0)
        t1.close(0.0)
    # files of a run nobody is alive in are stale: a new start replaces them
    stale = GroupControl.create(key, 2, 1, 7, slay.total_bytes, slay.fingerprint())
    stale.claim(0, ProcIdentity(pid=2 ** 22 + 17, start_time=1, pid_ns=ProcIdentity.current().pid_ns),
                1, SERVING)
    stale.close()
    fresh = HostTiers.create(config, lay0, key, slay)
    assert fresh.control.state(0) == 0
    fresh.close(0.0)


def test_host_tiers_restore_verifies_the_restored_layer_only(key):
    """Restoring a layer checks that layer's parts (each layer is read once as it is restored):
    a flipped byte in layer 1 fails restoring layer 1, not layer 0."""
    config = DwdpConfig(dwdp_size=2, num_experts_per_worker=4, num_prefetch_experts=3,
                        host_backup=True)
    lay0, lay1 = ExpertLayout(7, 2, 4, 3, 0), ExpertLayout(7, 2, 4, 3, 1)
    slay = store_layout(7, [_tensors(4, 0), _tensors(4, 0)])
    t0 = HostTiers.create(config, lay0, key, slay)
    t1 = HostTiers.open(config, lay1, key, slay)
    try:
        for pos in range(2):
            t0.fill(pos, _tensors(4, 0), None, 0, 4)
            t1.fill(pos, _tensors(4, 3), None, 3, 4)
        shapes = {"a": ("torch.uint8", (4, 3)), "b": ("torch.int16", (4, 2))}
        t1.store.experts(1, "a", 5, 1)[0, 1] = 77
        calls = []
        real = t1.store.verify
        t1.store.verify = lambda parts, what: (calls.append(sorted(parts)), real(parts, what))
        got = t1.restore(0, shapes, (3, 7), lambda shape, dtype: torch.empty(shape, dtype=dtype),
                         "restore layer 0")
        assert [p[:3] for p in calls[0]] == [(0, 3, 7)]
        assert torch.equal(got["a"], _tensors(4, 3)["a"])
        assert torch.equal(got["b"], _tensors(4, 3)["b"])
        with pytest.raises(DwdpBackupError, match=r"layer position 1 experts \[3, 7\)"):
            t1.restore(1, shapes, (3, 7), lambda shape, dtype: torch.empty(shape, dtype=dtype),
                       "restore layer 1")
    finally:
        t0.close(0.0)
        t1.close(0.0)


def test_group_key_from_environment():
    env = {"TRTLLM_DWDP_RANK": "1", "TRTLLM_DWDP_MASTER_ADDR": "h", "TRTLLM_DWDP_MASTER_PORT": "5"}
    assert group_key(0, env) == group_key(0, {**env, "TRTLLM_DWDP_RANK": "0"})
    assert group_key(0, env) != group_key(1, env)
    assert group_key(0, {**env, "TRTLLM_DWDP_JOB_KEY": "j"}) == group_key(0, {"TRTLLM_DWDP_JOB_KEY": "j"})
    assert group_key(0, {"PMIX_NAMESPACE": "ns"}) != group_key(0, {"PMIX_NAMESPACE": "nt"})
    assert group_key(0, {}) is None
    assert len(group_key(0, env)) == 16 and all(c in "0123456789abcdef" for c in group_key(0, env))


def test_process_checks():
    import subprocess
    import sys
    import threading
    import time

    from tensorrt_llm_dwdp.dwdp import liveness as lv

    me = ProcIdentity.current()
    assert lv.process_state(me) == lv.ALIVE and lv.can_check_process(me)
    assert lv.process_state(ProcIdentity(me.pid, me.start_time + 1, me.pid_ns)) == lv.GONE
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = int(open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[19])
    ident = ProcIdentity(child.pid, start, me.pid_ns)
    deadline = time.monotonic() + 30
    while lv.process_state(ident) == lv.ALIVE and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lv.process_state(ident) == lv.EXITING  # a zombie until reaped
    assert "exiting" in lv.down_reason(ident, lv.now_ns(), 10.0)
    child.wait()
    assert lv.process_state(ident) == lv.GONE
    assert "exited" in lv.down_reason(ident, lv.now_ns(), 10.0)
    now = lv.now_ns()
    assert lv.down_reason(me, now - int(11e9), 10.0, now).startswith("no heartbeat for 11.0 s")
    assert lv.down_reason(me, now - int(9e9), 10.0, now) is None
    stamps = []
    third = threading.Event()

    def stamp(ns):
        stamps.append(ns)
        if len(stamps) >= 3:
            third.set()

    beat = lv.Heartbeat(stamp, 0.01, "test-heartbeat")
    # An event, not a sleep: the thread beats on however slowly a loaded machine schedules it.
    assert third.wait(30), stamps
    beat.stop()
    stopped = len(stamps)
    assert not beat._thread.is_alive() and stamps == sorted(stamps)
    assert len(stamps) == stopped  # nothing beats after stop()


def test_abandoned_groups_are_collected_live_ones_kept(key):
    from tensorrt_llm_dwdp.dwdp import control as ctl_mod

    live = GroupControl.create(key + "l", 2, 1, 4, 4096, fingerprint=1)
    dead = GroupControl.create(key + "d", 2, 1, 4, 4096, fingerprint=1)
    try:
        ns = ProcIdentity.current().pid_ns
        gone = ProcIdentity(pid=2 ** 22 + 5, start_time=1, pid_ns=ns)
        dead._w[ctl_mod._CREATOR:ctl_mod._CREATOR + 3] = (gone.pid, gone.start_time, gone.pid_ns)
        dead.claim(0, gone, 1, SERVING)
        open(group_path(key + "d", "store"), "w").close()
        assert not live.abandoned() and dead.abandoned()
        collected = ctl_mod.collect_stale_groups()
        assert key + "d" in collected and key + "l" not in collected
        assert not glob.glob(group_path(key + "d", "*"))
        assert glob.glob(group_path(key + "l", "*"))
    finally:
        live.close()
        dead.close()
        unlink_group(key + "l")
