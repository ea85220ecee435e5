"""DwdpManager with host tiers on CPU in one process: ranks are threads (exchange and close run
concurrently), steps are driven one rank at a time from the test, so failover, retry, rejoin and
offload happen at exactly chosen points.

A rank "dies" by having its control slot point at a process that does not exist and its own
expert memory overwritten with 0xFF: a survivor that still read it would see wrong bytes. Every
(layer, tensor, expert) carries a unique byte ramp and buffers start poisoned.
"""
import glob

import pytest
import torch

from _thread_group import _in_threads
from test_manager_protocol import _check_view, _expert_bytes

from tensorrt_llm_dwdp.comm.local import LocalComm
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.dwdp.control import GROUP_PREFIX, SHM_DIR, GroupControl
from tensorrt_llm_dwdp.dwdp.errors import DwdpPeerError, DwdpStepRetry
from tensorrt_llm_dwdp.dwdp.host_tiers import DetachedComm, RunningGroup
from tensorrt_llm_dwdp.dwdp.liveness import ProcIdentity
from tensorrt_llm_dwdp.dwdp.manager import DwdpManager

LAYERS = (2, 5, 7)
# whole pages per expert: in the composite view (the default) every fetched byte then lies on
# pool pages, so each prefetch reads the whole ranges as in the multi view (no edges)
NAMES = {"w3_w1_weight": (torch.uint8, (2, 4096)), "w3_w1_weight_scale": (torch.float8_e4m3fn,
                                                                           (4096,)),
         "fc31_alpha": (torch.float32, (1024,)), "w2_bias": (torch.bfloat16, (2048,))}


def _tensors(mgr, layer, first, n, alloc):
    out = {}
    for name_id, (name, (dtype, tail)) in enumerate(NAMES.items()):
        t = alloc((n,) + tail, dtype)
        raw = t.view(torch.uint8).view(n, -1)
        for i in range(n):
            raw[i] = _expert_bytes(layer, name_id, first + i, raw.shape[1])
        out[name] = t
    return out


def _register(mgr):
    lo = mgr.layout.owned_range()[0]
    res = mgr.resident_experts
    h = mgr.tier_layout.host_experts
    for layer in LAYERS:
        own = _tensors(mgr, layer, lo, res, mgr.allocate)
        host = _tensors(mgr, layer, lo + res, h, lambda s, d: torch.empty(s, dtype=d)) if h else None
        mgr.register_layer(layer, own, host)


def _step(mgr, e, retry_expected=False):
    """One step over every layer with every view checked; returns whether it was retried."""
    mgr.start_step()
    for layer in LAYERS:
        _check_view(mgr.weights(layer), layer, e, NAMES)
        mgr.done(layer)
    try:
        mgr.end_step()
    except DwdpStepRetry:
        assert retry_expected, "unexpected retry"
        return True
    return False


def _group(size, config, e):
    """Managers of a ``size``-rank group after the exchange (threads), buffers poisoned."""
    def build(r, comm):
        mgr = DwdpManager(config, e, comm, "cpu")
        _register(mgr)
        mgr.exchange()
        mgr.poison_buffers(0xA5)
        return mgr

    mgrs = _in_threads(size, build)
    for m in mgrs:
        if isinstance(m, BaseException):
            raise m
    return mgrs


def _close(mgrs):
    """Close live ranks together (the close barrier waits for every rank that is up)."""
    errors = [e for e in _in_threads(len(mgrs), lambda r, comm: mgrs[r].close()) if e is not None]
    assert not errors, errors


def _kill(mgr):
    """The rank's process is gone (as its peers see it) and its memory holds garbage."""
    ctl = mgr._host.control
    me = ProcIdentity.current()
    mgr._host._heartbeat.stop()
    ctl.claim(mgr.rank, ProcIdentity(2 ** 22 + 11, 1, me.pid_ns), ctl.incarnation(mgr.rank), 2)
    for own in mgr._own:
        for t in own.values():
            t.view(torch.uint8).fill_(0xFF)


def _bury(mgr):
    """A dead rank closes nothing; release here what the OS would at its exit (its mappings and
    memory), so the later tests of this process do not see them."""
    mgr._closed = True
    if mgr._runtime is not None:
        mgr._runtime.close()
    mgr._transport.close()
    mgr._host.store.close()
    mgr._host.control.close()


def _files(key):
    return glob.glob(f"{SHM_DIR}/{GROUP_PREFIX}{key}_*")


def _config(s, w, p, **kw):
    return DwdpConfig(dwdp_size=s, num_experts_per_worker=w, num_prefetch_experts=p,
                      peer_timeout_s=10.0, host_backup=True, **kw)


def test_offload_one_rank_prefetches_its_host_experts():
    config = DwdpConfig(dwdp_size=1, host_experts_per_worker=2)
    with DwdpManager(config, 6, LocalComm(), "cpu") as mgr:
        _register(mgr)
        mgr.exchange()
        key = mgr._host.key
        assert len(_files(key)) == 3  # control block, store, handle record
        mgr.poison_buffers(0xA5)
        assert mgr.view_offsets == (0, 4)
        for _ in range(3):
            _step(mgr, 6)
        mgr.synchronize()
        per_expert = sum(torch.empty((1,) + t, dtype=d).nbytes for d, t in NAMES.values())
        st = mgr.stats
        assert st.host_bytes_copied == st.bytes_copied == st.prefetches * 2 * per_expert
    assert not _files(key)


@pytest.mark.parametrize("h, view", [(0, "composite"), (2, "composite"), (2, "multi")])
def test_failover_retries_the_step_and_serves_from_the_host_store(h, view):
    s, w, p = 3, 5, 3
    e = w + (s - 1) * p
    mgrs = _group(s, _config(s, w, p, host_experts_per_worker=h, expert_view=view), e)
    assert mgrs[0].expert_view == view
    survivors = [mgrs[0], mgrs[2]]
    key = mgrs[0]._host.key
    for m in mgrs:
        assert not _step(m, e)
    mgrs[0].start_step()  # the peer dies while rank 0 computes (its copies already landed)
    for layer in LAYERS[:1]:
        _check_view(mgrs[0].weights(layer), layer, e, NAMES)
        mgrs[0].done(layer)
    _kill(mgrs[1])
    for layer in LAYERS[1:]:
        mgrs[0].weights(layer)
        mgrs[0].done(layer)
    with pytest.raises(DwdpStepRetry, match=r"peer\(s\) \[1\] went down"):
        mgrs[0].end_step()
    assert not _step(mgrs[0], e)  # the retried step reads rank 1's experts from the host store
    assert not _step(mgrs[2], e)  # rank 2 sees it down before its step: no retry needed
    for m in survivors:
        for _ in range(2):
            assert not _step(m, e)
        st = m.stats
        assert st.failovers == 1 and st.peers_down == 1 and m.peers_down == (1,)
        assert st.host_bytes_copied > 0
        assert [ev.kind for ev in m.tier_events] == ["failover"]
        assert "peer 1 is down (process" in m.tier_events[0].message
    assert mgrs[0].stats.step_retries == 1 and mgrs[2].stats.step_retries == 0
    assert "seen at end_step" in mgrs[0].tier_events[0].message
    assert "seen at start_step" in mgrs[2].tier_events[0].message
    _close(survivors)
    _bury(mgrs[1])
    assert not _files(key)


def test_corrupt_backup_is_detected_at_failover():
    s, w, p = 2, 4, 4
    mgrs = _group(s, _config(s, w, p), 8)
    store = mgrs[0]._host.store
    store.experts(0, "w2_bias", 6, 1)[0, 1] ^= 0x10  # one bit of rank 1's part of layer 2
    _kill(mgrs[1])
    with pytest.raises(DwdpPeerError, match=r"CRC32 .*recorded"):
        _step(mgrs[0], 8)
    with pytest.raises(DwdpPeerError, match="cannot serve peer"):
        mgrs[0].start_step()  # and it stays broken
    mgrs[0].abort_step()
    mgrs[0].close()
    _bury(mgrs[1])


def _rejoin(config, e, key, rank, survivors):
    """A new manager for ``rank`` rejoining the running group of ``key`` (what
    ``DwdpManager.from_environment`` does for a restarted process)."""
    control = GroupControl.open(key)
    running = RunningGroup(key, rank, control, {r: control.read_record(r, control.incarnation(r))
                                                for r in survivors})
    return DwdpManager(config, e, DetachedComm(rank, config.dwdp_size), "cpu", rejoin=running)


def _restarted_rank_1():
    """A group of 3 (W = 4, P = 2) whose rank 1 died, and the manager of its restarted process
    (not restored yet): (the group's managers, the new one, E)."""
    s, w, p = 3, 4, 2
    e = w + (s - 1) * p
    config = _config(s, w, p)
    mgrs = _group(s, config, e)
    _kill(mgrs[1])
    return mgrs, _rejoin(config, e, mgrs[0]._host.key, 1, (0, 2)), e


def test_a_peer_that_restarted_before_the_survivors_noticed_is_failed_over_then_taken_back():
    """The slot shows a live process again, but not the one whose memory the survivors map."""
    mgrs, new, e = _restarted_rank_1()
    for layer in LAYERS:
        new.register_layer(layer, new.restore_layer(layer))
    new.exchange()
    for m in (mgrs[0], mgrs[2]):
        assert not _step(m, e)  # switched at start_step: nothing read the dead process
        assert m.stats.failovers == 1 and m.stats.rejoins == 1 and m.peers_down == ()
        assert "it restarted (incarnation 2; this rank mapped incarnation 1)" in \
            m.tier_events[0].message
        assert [ev.kind for ev in m.tier_events] == ["failover", "rejoin"]
    assert not _step(new, e)
    _close([mgrs[0], mgrs[2], new])
    _bury(mgrs[1])


def test_a_rejoining_rank_in_another_weight_layout_is_refused_before_restoring():
    """The group registered linear experts (the store holds them so): a restarted rank that
    would keep them preshuffled is refused at its first restore_layer, naming both layouts,
    before it allocates or reads anything; with the group's layout it restores as usual."""
    from tensorrt_llm_dwdp.dwdp.errors import DwdpMismatchError

    mgrs, new, e = _restarted_rank_1()
    new.allocate = lambda *a: pytest.fail("allocated before the layout was checked")
    with pytest.raises(DwdpMismatchError, match="rank 1 restoring layer 2: this rank keeps "
                       "'preshuffled' expert weights but its running group's .* are 'linear'"):
        new.restore_layer(LAYERS[0], weight_layout="preshuffled")
    del new.allocate
    for layer in LAYERS:
        new.register_layer(layer, new.restore_layer(layer, weight_layout="linear"))
    new.exchange()
    for m in (mgrs[0], mgrs[2], new):
        assert not _step(m, e)
    _close([mgrs[0], mgrs[2], new])
    _bury(mgrs[1])


def test_rejoin_restores_from_the_store_and_moves_back_to_peer_memory():
    s, w, p = 3, 4, 2
    e = w + (s - 1) * p
    config = _config(s, w, p)
    mgrs = _group(s, config, e)
    key = mgrs[0]._host.key
    _kill(mgrs[1])
    for m in (mgrs[0], mgrs[2]):
        _step(m, e, retry_expected=True)
        assert m.peers_down == (1,)
    control = GroupControl.open(key)
    running = RunningGroup(key, 1, control, {r: control.read_record(r, control.incarnation(r))
                                             for r in (0, 2)})
    new = DwdpManager(config, e, DetachedComm(1, s), "cpu", rejoin=running)
    assert new.restores_experts
    lo = new.layout.owned_range()[0]
    for layer in LAYERS:
        restored = new.restore_layer(layer)
        _check_restored(restored, layer, lo, w)
        new.register_layer(layer, restored)
    new.exchange()
    assert not new.restores_experts and new.peers_down == ()
    assert [ev.kind for ev in new.tier_events] == ["rejoined"]
    new.poison_buffers(0xA5)
    for m in (mgrs[0], mgrs[2], new):
        assert not _step(m, e)
    for m in (mgrs[0], mgrs[2]):
        assert m.peers_down == () and m.stats.rejoins == 1
        assert [ev.kind for ev in m.tier_events] == ["failover", "rejoin"]
    # from now on rank 1's experts come from its memory, not the store: garble the store copy
    for pos in range(len(LAYERS)):
        for name in NAMES:
            mgrs[0]._host.store.experts(pos, name, lo, w).fill_(0x33)
    for m in (mgrs[0], mgrs[2], new):
        assert not _step(m, e)
    _close([mgrs[0], mgrs[2], new])
    _bury(mgrs[1])
    assert not _files(key)


def _check_restored(tensors, layer, lo, n):
    for name_id, name in enumerate(NAMES):
        raw = tensors[name].view(torch.uint8).reshape(n, -1)
        for i in range(n):
            assert torch.equal(raw[i], _expert_bytes(layer, name_id, lo + i, raw.shape[1]))


def test_a_silent_peer_is_declared_down_and_learns_it_when_it_wakes():
    """Stops answering (heartbeat silent past peer_dead_after_s) while its process lives: the
    survivors fail over; the silent rank's next step raises, naming who declared it down."""
    from tensorrt_llm_dwdp.dwdp.liveness import now_ns

    s, w, p = 2, 4, 4
    config = _config(s, w, p, heartbeat_interval_s=0.1, peer_dead_after_s=1.0)
    mgrs = _group(s, config, 8)
    mgrs[1]._host._heartbeat.stop()
    mgrs[1]._host.control.stamp(1, now_ns() - int(5e9))
    assert not _step(mgrs[0], 8)
    assert "no heartbeat for 5." in mgrs[0].tier_events[0].message
    with pytest.raises(DwdpPeerError, match=r"declared down by rank\(s\) \[0\]"):
        mgrs[1].start_step()
    _close(mgrs)
