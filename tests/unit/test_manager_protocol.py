"""DwdpManager on CPU in one process: ranks are threads sharing a ThreadComm, memory is real
POSIX shared memory (the shm transport), copies run in each manager's copy thread."""
import glob
import os
import time

import pytest
import torch

from tensorrt_llm_dwdp.comm.local import LocalComm
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.dwdp.errors import (DwdpMismatchError, DwdpPeerError, DwdpRegistrationError,
                                      DwdpStateError)
from tensorrt_llm_dwdp.dwdp.manager import DwdpManager

from _thread_group import _in_threads


def _expert_bytes(layer, name_id, expert, n):
    key = (layer * 977 + name_id * 89 + expert * 11) % 251
    return ((torch.arange(n) * 7 + key) % 251).to(torch.uint8)


NAMES = {"w3_w1_weight": (torch.uint8, (4, 3)), "w3_w1_weight_scale": (torch.float8_e4m3fn, (4, 1)),
         "fc31_alpha": (torch.float32, ()), "w2_bias": (torch.bfloat16, (3,))}


def _register_all(mgr, layers, w):
    lo = mgr.layout.owned_range()[0]
    for layer in layers:
        tensors = {}
        for name_id, (name, (dtype, tail)) in enumerate(NAMES.items()):
            t = mgr.allocate((w,) + tail, dtype)
            raw = t.view(torch.uint8).view(w, -1)
            for i in range(w):
                raw[i] = _expert_bytes(layer, name_id, lo + i, raw.shape[1])
            tensors[name] = t
        mgr.register_layer(layer, tensors)


def _check_view(view, layer, e, names=NAMES):
    for name_id, name in enumerate(names):
        whole = torch.cat([x.view(torch.uint8).reshape(x.shape[0], -1) for x in view[name]])
        assert whole.shape[0] == e
        for g in range(e):
            assert torch.equal(whole[g], _expert_bytes(layer, name_id, g, whole.shape[1])), \
                (layer, name, g)


def _config(s, w, p, **kw):
    kw.setdefault("peer_timeout_s", 10.0)
    return DwdpConfig(dwdp_size=s, num_experts_per_worker=w, num_prefetch_experts=p, **kw)


@pytest.mark.parametrize("s, w, p, layers, contention", [
    (2, 3, 2, (0, 1, 2), False),     # odd layer count: buffer parity alternates across steps
    (2, 3, 3, (5, 9), True),         # disjoint partition, non-contiguous layer ids
    (3, 4, 2, (7,), True),           # one layer: it is its own "layer two ahead"
    (4, 2, 1, (0, 1, 2, 3), False),
])
def test_views_exact_over_steps(s, w, p, layers, contention):
    """The multi view: own tensors in place, one buffer per peer, shm names (the composite view
    of the same protocol: test_composite_views.py)."""
    e = w + (s - 1) * p
    config = _config(s, w, p, contention_opt=contention, prefetch_slice_bytes=5,
                     expert_view="multi")

    def rank_fn(r, comm):
        with DwdpManager(config, e, comm, "cpu") as mgr:
            _register_all(mgr, layers, w)
            mgr.exchange()
            mgr.poison_buffers(0xA5)
            for step in range(3):
                mgr.start_step()
                for layer in layers:
                    view = mgr.weights(layer)
                    assert len(view) == len(NAMES) and all(len(v) == s for v in view.values())
                    assert view["w3_w1_weight"][r].data_ptr() == mgr._own[mgr.layer_indices.index(layer)]["w3_w1_weight"].data_ptr()
                    _check_view(view, layer, e)
                    assert mgr.weights(layer) is view  # prebuilt, no allocation per call
                    mgr.done(layer)
            mgr.synchronize()
            st = mgr.stats
            assert st.prefetches == 3 * len(layers) + 2
            assert st.waits == 3 * len(layers) * 2
            per_expert = sum(torch.empty((1,) + t, dtype=d).nbytes for d, t in NAMES.values())
            assert st.bytes_copied == st.prefetches * (s - 1) * p * per_expert
            assert sum(x.prefetches for x in st.layers) == st.prefetches
            with pytest.raises(Exception):
                st.bytes_copied = 0  # frozen snapshot
            names = list(mgr._transport.own_names)
        assert mgr.mapped_allocations == 0
        return names

    results = _in_threads(s, rank_fn)
    for res in results:
        assert not isinstance(res, BaseException), repr(res)
    for names in results:
        assert names and not [n for n in names if os.path.exists(f"/dev/shm/{n}")]


def test_start_step_is_noop_after_wraparound_and_abort_step():
    config = _config(2, 2, 2)

    def rank_fn(r, comm):
        with DwdpManager(config, 4, comm, "cpu") as mgr:
            _register_all(mgr, (0, 1, 2, 3), 2)
            mgr.exchange()
            mgr.start_step()
            mgr.start_step()  # already queued: nothing new
            assert mgr.stats.prefetches == 2
            for layer in (0, 1, 2, 3):
                mgr.weights(layer)
                mgr.done(layer)
            assert mgr.stats.prefetches == 6  # 4 + the wrap-around's 2
            mgr.start_step()
            assert mgr.stats.prefetches == 6
            mgr.weights(0)
            mgr.done(0)
            with pytest.raises(DwdpStateError, match="layer 1 of the current step"):
                mgr.start_step()
            mgr.abort_step()  # forward raised mid-step: the next step starts clean
            mgr.start_step()
            for layer in (0, 1, 2, 3):
                _check_view(mgr.weights(layer), layer, 4)
                mgr.done(layer)
        return True

    assert _in_threads(2, rank_fn) == [True, True]


@pytest.mark.parametrize("layers, fail_at", [((0, 1, 2, 3), 1), ((0, 1, 2), 2), ((4, 6, 8), 0)])
def test_abort_mid_step_with_slow_copies_then_views_stay_exact(monkeypatch, layers, fail_at):
    """A step raising before done(fail_at) leaves a queued fill nobody reads in a buffer the next
    step refills; with slow copies the stale fill finishes first and must not release the reader."""
    import ctypes

    from tensorrt_llm_dwdp.dwdp import copy_engine

    real = ctypes.memmove

    def slow(d, s, n):
        time.sleep(0.01)
        return real(d, s, n)

    monkeypatch.setattr(copy_engine.ctypes, "memmove", slow)
    config = _config(2, 2, 2)

    def rank_fn(r, comm):
        with DwdpManager(config, 4, comm, "cpu") as mgr:
            _register_all(mgr, layers, 2)
            mgr.exchange()
            mgr.start_step()
            for layer in layers[:fail_at]:
                mgr.weights(layer)
                mgr.done(layer)
            mgr.abort_step()
            for _ in range(2):
                mgr.start_step()
                for layer in layers:
                    _check_view(mgr.weights(layer), layer, 4)
                    mgr.done(layer)
        return True

    assert _in_threads(2, rank_fn) == [True, True]


def test_mismatched_shape_fails_on_every_rank():
    config = _config(2, 2, 1)

    def rank_fn(r, comm):
        with DwdpManager(config, 3, comm, "cpu") as mgr:
            shape = (2, 4) if r == 0 else (2, 5)
            mgr.register_layer(0, {"w2_weight": mgr.allocate(shape, torch.uint8)})
            mgr.exchange()

    results = _in_threads(2, rank_fn)
    for res in results:
        assert isinstance(res, DwdpMismatchError), res
        assert "rank 1 layer 0 tensor 'w2_weight' has shape (2, 5) but rank 0 has (2, 4)" in str(res)


def test_mismatched_dtype_layers_and_num_experts():
    def rank_fn(r, comm):
        config = _config(2, 2, 1)
        with DwdpManager(config, 3, comm, "cpu") as mgr:
            dtype = torch.uint8 if r == 0 else torch.int8
            mgr.register_layer(0, {"w": mgr.allocate((2, 4), dtype)})
            if r == 1:
                mgr.register_layer(1, {"w": mgr.allocate((2, 4), dtype)})
            mgr.exchange()

    for res in _in_threads(2, rank_fn):
        assert isinstance(res, DwdpMismatchError), res
        assert "rank 1 registered 2 layer(s) [0, 1] but rank 0 registered 1 layer(s) [0]" in str(res)

    def rank_fn2(r, comm):
        config = _config(2, 2, 1, peer_timeout_s=5.0 + r)
        with DwdpManager(config, 3, comm, "cpu") as mgr:
            mgr.register_layer(0, {"w": mgr.allocate((2, 4), torch.uint8 if r == 0 else torch.int8)})
            mgr.exchange()

    for res in _in_threads(2, rank_fn2):
        assert isinstance(res, DwdpMismatchError), res
        assert "rank 1 has dwdp_config.peer_timeout_s = 6.0 but rank 0 has 5.0" in str(res)
        assert "layer 0 tensor 'w' has dtype torch.int8 but rank 0 has torch.uint8" in str(res)


@pytest.mark.parametrize("view, message", [
    ("composite", "not in memory the composite view can map twice: allocate expert weights "
                  "with DwdpManager.allocate(shape, dtype)"),
    ("multi", "not in shared memory")])
def test_registration_error_reaches_peer_without_timeout(view, message):
    config = _config(2, 2, 1, peer_timeout_s=30.0, expert_view=view)

    def rank_fn(r, comm):
        try:
            with DwdpManager(config, 3, comm, "cpu") as mgr:
                t = torch.zeros(2, 4) if r == 0 else mgr.allocate((2, 4), torch.float32)
                mgr.register_layer(0, {"w": t})
                mgr.exchange()
        except Exception as exc:  # noqa: BLE001
            return exc, comm.timed_out

    (e0, waited0), (e1, waited1) = _in_threads(2, rank_fn)
    assert isinstance(e0, DwdpRegistrationError) and message in str(e0)
    assert isinstance(e1, DwdpPeerError) and "rank 0 failed before the handle exchange" in str(e1)
    # The error travelled as a message: no rank ran out its peer timeout (a count, not a clock,
    # so a loaded machine cannot fail it).
    assert waited0 == [] and waited1 == []


def test_peer_that_never_exchanges_times_out():
    config = _config(2, 2, 1, peer_timeout_s=0.5)

    def rank_fn(r, comm):
        if r == 1:
            return "absent"
        start = time.monotonic()
        try:
            with DwdpManager(config, 3, comm, "cpu") as mgr:
                mgr.register_layer(0, {"w": mgr.allocate((2, 4), torch.uint8)})
                mgr.exchange()
        except DwdpPeerError as exc:
            return exc, time.monotonic() - start, comm.timed_out

    (exc, took, waited), absent = _in_threads(2, rank_fn)
    assert absent == "absent"
    assert "rank(s) [1]" in str(exc) and took >= 0.5
    # close() did not wait again: one wait ran out (the exchange), counted rather than timed.
    assert len(waited) == 1, waited


def test_single_rank_manager_needs_no_shared_memory():
    with DwdpManager(DwdpConfig(), 4, LocalComm(), "cpu") as mgr:
        assert not mgr.enabled and mgr.layout.tensor_sizes == (4,)
        a = torch.arange(8, dtype=torch.float32).view(4, 2)
        mgr.register_layer(3, {"w2_weight": a})
        mgr.exchange()
        mgr.start_step()
        view = mgr.weights(3)
        assert view["w2_weight"][0] is a and len(view["w2_weight"]) == 1
        mgr.done(3)
        assert mgr.buffer_bytes == 0


def _single():
    return DwdpManager(DwdpConfig(dwdp_size=1, num_experts_per_worker=4), 4, LocalComm(), "cpu")


def test_registration_errors_name_layer_and_tensor():
    with _single() as mgr:
        good = torch.zeros(4, 6)
        with pytest.raises(DwdpRegistrationError, match=r"layer 0 tensor 'w' is not contiguous"):
            mgr.register_layer(0, {"w": good[:, ::2]})
        with pytest.raises(DwdpRegistrationError, match=r"shape \(3, 6\); dim 0 must be num_experts_per_worker = 4"):
            mgr.register_layer(0, {"w": torch.zeros(3, 6)})
        with pytest.raises(DwdpRegistrationError, match=r"dim 0 must be"):
            mgr.register_layer(0, {"w": torch.zeros(())})
        with pytest.raises(DwdpRegistrationError, match=r"is on meta, expected cpu"):
            mgr.register_layer(0, {"w": torch.empty(4, 2, device="meta")})
        with pytest.raises(DwdpRegistrationError, match=r"is a list, not a torch.Tensor"):
            mgr.register_layer(0, {"w": [1, 2]})
        with pytest.raises(DwdpRegistrationError, match="no tensors"):
            mgr.register_layer(0, {})
        with pytest.raises(DwdpRegistrationError, match="non-negative int"):
            mgr.register_layer(-1, {"w": good})
        mgr.register_layer(0, {"w": good})
        with pytest.raises(DwdpRegistrationError, match="already registered"):
            mgr.register_layer(0, {"w": good})


def test_protocol_order_errors():
    mgr = _single()
    with pytest.raises(DwdpStateError, match="before any register_layer"):
        mgr.exchange()
    mgr.register_layer(0, {"w": torch.zeros(4)})
    mgr.register_layer(1, {"w": torch.zeros(4)})
    with pytest.raises(DwdpStateError, match=r"weights\(0\) before exchange"):
        mgr.weights(0)
    with pytest.raises(DwdpStateError, match="before exchange"):
        mgr.start_step()
    mgr.exchange()
    with pytest.raises(DwdpStateError, match="twice"):
        mgr.exchange()
    with pytest.raises(DwdpStateError, match="after exchange"):
        mgr.register_layer(2, {"w": torch.zeros(4)})
    with pytest.raises(DwdpStateError, match="before start_step"):
        mgr.weights(0)
    mgr.start_step()
    with pytest.raises(DwdpStateError, match=r"weights\(1\) out of order: layer 0 is next"):
        mgr.weights(1)
    with pytest.raises(DwdpStateError, match=r"layer 7 is not registered"):
        mgr.done(7)
    mgr.weights(0)
    mgr.done(0)
    with pytest.raises(DwdpStateError, match=r"done\(0\) out of order: layer 1 is next"):
        mgr.done(0)
    mgr.close()
    mgr.close()  # idempotent
    with pytest.raises(DwdpStateError, match="closed"):
        mgr.allocate((4,), torch.uint8)
    with pytest.raises(DwdpStateError, match="closed"):
        mgr.weights(1)


def test_constructor_checks():
    with pytest.raises(ValueError, match="does not cover the model's experts"):
        DwdpManager(_config(2, 3, 2), 6, LocalComm(), "cpu")
    with pytest.raises(DwdpMismatchError, match="group has 1 rank"):
        DwdpManager(_config(2, 3, 2), 5, LocalComm(), "cpu")


def test_peer_that_closes_a_bare_comm_is_named_not_a_type_error():
    """A rank whose DwdpManager constructor failed after connect() closes its comm (a barrier
    carrying None); its peers' exchange must fail with DwdpPeerError naming it."""
    config = _config(2, 2, 1, peer_timeout_s=5.0)

    def rank_fn(r, comm):
        if r == 1:
            comm.barrier(5.0, "DWDP close")  # what GroupComm.close does for TCP
            return "left"
        with DwdpManager(config, 3, comm, "cpu") as mgr:
            _register_all(mgr, (0,), 2)
            mgr.exchange()

    err, left = _in_threads(2, rank_fn)
    assert left == "left"
    assert isinstance(err, DwdpPeerError), repr(err)
    assert "rank 1 left the group without a DWDP manager" in str(err)


def test_close_in_with_block_does_not_mask_error():
    with pytest.raises(RuntimeError, match="boom"):
        with _single():
            raise RuntimeError("boom")
    assert not glob.glob(f"/dev/shm/trtllm_dwdp_{os.getpid()}_*")


def test_peer_gone_before_close_fails_close_in_time_after_cleanup():
    config = _config(2, 2, 1, peer_timeout_s=0.5, expert_view="multi")  # checks shm names

    def rank_fn(r, comm):
        mgr = DwdpManager(config, 3, comm, "cpu")
        _register_all(mgr, (0,), 2)
        mgr.exchange()
        if r == 1:
            return "vanished"  # exchanged, then never reaches close()
        start = time.monotonic()
        with pytest.raises(DwdpPeerError, match=r"DWDP close.*rank\(s\) \[1\]"):
            mgr.close()
        took = time.monotonic() - start
        names = mgr._transport.own_names
        return (took, comm.timed_out, mgr.mapped_allocations,
                [n for n in names if os.path.exists(f"/dev/shm/{n}")])

    (took, waited, mapped, left), gone = _in_threads(2, rank_fn)
    assert gone == "vanished"
    # close() waited out the peer timeout once, then gave up (a count, not an upper time bound).
    assert took >= 0.5 and len(waited) == 1, (took, waited)
    assert mapped == 0 and left == []


def test_from_environment(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("TRTLLM_DWDP_", "OMPI_", "PMIX_", "PMI_")):
            monkeypatch.delenv(key)
    with DwdpManager.from_environment(DwdpConfig(), 8, "cpu") as mgr:
        assert isinstance(mgr.comm, LocalComm) and mgr.layout.tensor_sizes == (8,)
    with pytest.raises(RuntimeError, match="launch the ranks with mpirun"):
        DwdpManager.from_environment(_config(2, 3, 2), 5, "cpu")
    with pytest.raises(ValueError, match="does not cover"):
        DwdpManager.from_environment(_config(2, 3, 2), 6, "cpu")
