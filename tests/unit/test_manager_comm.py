"""Group communicators: TCP rendezvous (ranks as threads of one process), connect()'s choice,
and the pure agreement checks every rank runs on the exchanged records."""
import socket
import threading
import time

import pytest

from tensorrt_llm_dwdp.dwdp.agreement import MAX_LINES, config_problems, record_problems, summarize
from tensorrt_llm_dwdp.comm import LocalComm, TcpGroupComm, connect
from tensorrt_llm_dwdp.comm.mpi import under_mpirun
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.dwdp.errors import DwdpMismatchError, DwdpPeerError


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(s=2, timeout=10.0, **kw):
    return DwdpConfig(dwdp_size=s, num_experts_per_worker=2, num_prefetch_experts=1,
                      peer_timeout_s=timeout, **kw)


def _threads(n, fn):
    out = [None] * n

    def body(r):
        try:
            out[r] = fn(r)
        except BaseException as exc:  # noqa: BLE001
            out[r] = exc

    ts = [threading.Thread(target=body, args=(r,)) for r in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return out


def test_tcp_allgather_barrier_close():
    port = _port()

    def rank(r):
        env = {"TRTLLM_DWDP_RANK": str(r), "TRTLLM_DWDP_MASTER_ADDR": "127.0.0.1",
               "TRTLLM_DWDP_MASTER_PORT": str(port)}
        comm = connect(_cfg(3), env)
        assert isinstance(comm, TcpGroupComm) and comm.size == 3 and comm.rank == r
        got = [comm.allgather({"r": r, "i": i}, 10, "test") for i in range(3)]
        comm.barrier(10, "test barrier")
        comm.close()
        comm.close()
        return got

    results = _threads(3, rank)
    for res in results:
        assert not isinstance(res, BaseException), repr(res)
        assert res == [[{"r": r, "i": i} for r in range(3)] for i in range(3)]


def test_tcp_timeout_names_missing_rank():
    port = _port()
    start = time.monotonic()
    with pytest.raises(DwdpPeerError, match=r"no answer from rank\(s\) \[1\] within 0.5 s"):
        TcpGroupComm(_cfg(2, timeout=0.5), 0, "127.0.0.1", port)
    # generous: it gave up (a hang would meet the suite's timeout), even on a loaded machine
    assert time.monotonic() - start < 30


def test_tcp_unreachable_master():
    with pytest.raises(DwdpPeerError, match="could not reach the rendezvous store"):
        TcpGroupComm(_cfg(2, timeout=0.5), 1, "127.0.0.1", _port())


def test_tcp_hello_detects_config_mismatch_on_all_ranks():
    port = _port()
    results = _threads(2, lambda r: TcpGroupComm(
        _cfg(2, contention_opt=(r == 1)), r, "127.0.0.1", port))
    for res in results:
        assert isinstance(res, DwdpMismatchError), res
        assert "rank 1 has dwdp_config.contention_opt = True but rank 0 has False" in str(res)


def test_tcp_rank0_releases_its_port_when_the_hello_fails():
    """A failed start-up must not keep rank 0's store server (and port) alive while the caller
    still holds the exception: a retry on the same port would fail with 'address in use'."""
    port = _port()
    with pytest.raises(DwdpPeerError) as failed:
        TcpGroupComm(_cfg(2, timeout=0.3), 0, "127.0.0.1", port)
    assert failed.value is not None  # the traceback (and its frames) are still referenced here
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # raises OSError while the old store still listens


def test_tcp_env_errors():
    with pytest.raises(ValueError, match="TRTLLM_DWDP_MASTER_ADDR"):
        connect(_cfg(), {"TRTLLM_DWDP_RANK": "0"})
    with pytest.raises(ValueError, match="TRTLLM_DWDP_RANK must be an integer"):
        connect(_cfg(), {"TRTLLM_DWDP_RANK": "x", "TRTLLM_DWDP_MASTER_ADDR": "h",
                         "TRTLLM_DWDP_MASTER_PORT": "1"})
    with pytest.raises(ValueError, match=r"TRTLLM_DWDP_RANK=2 outside \[0, dwdp_size=2\)"):
        connect(_cfg(), {"TRTLLM_DWDP_RANK": "2", "TRTLLM_DWDP_MASTER_ADDR": "h",
                         "TRTLLM_DWDP_MASTER_PORT": "1"})


def test_connect_choice():
    assert isinstance(connect(DwdpConfig(), {}), LocalComm)
    with pytest.raises(RuntimeError, match="launch the ranks with mpirun"):
        connect(_cfg(), {})
    assert under_mpirun({"OMPI_COMM_WORLD_RANK": "0"}) and under_mpirun({"PMI_RANK": "1"})
    assert not under_mpirun({})
    assert LocalComm().allgather(5, 1, "x") == [5]


def _record(**over):
    rec = {"config": _cfg().to_dict(), "num_experts": 3, "transport": "shm",
           "weight_layout": "linear", "layers": [(0, {"w": ("torch.uint8", (2, 4)), "s": ("torch.float32", (2,))})]}
    rec.update(over)
    return rec


def test_record_problems_name_rank_and_tensor():
    assert record_problems([_record(), _record()]) == []
    lines = record_problems([_record(), _record(num_experts=4), _record(transport="cuda_ipc"),
                             _record(weight_layout="preshuffled")])
    assert lines == ["rank 1 has num_experts = 4 but rank 0 has 3",
                     "rank 2 has transport = 'cuda_ipc' but rank 0 has 'shm'",
                     "rank 3 has weight_layout = 'preshuffled' but rank 0 has 'linear'"]
    other = _record(layers=[(0, {"w": ("torch.int8", (2, 5)), "x": ("torch.float32", (2,))})])
    lines = record_problems([_record(), other])
    assert "rank 1 has ['x'] that rank 0 lacks, and lacks ['s'] that rank 0 has" in lines[0]
    other = _record(layers=[(0, {"w": ("torch.int8", (2, 5)), "s": ("torch.float32", (2,))})])
    assert record_problems([_record(), other]) == [
        "rank 1 layer 0 tensor 'w' has dtype torch.int8 but rank 0 has torch.uint8",
        "rank 1 layer 0 tensor 'w' has shape (2, 5) but rank 0 has (2, 4)"]
    assert config_problems([{"a": 1}, {"a": 1, "b": 2}]) == [
        "rank 1 has dwdp_config.b = 2 but rank 0 has None"]


def test_summarize_caps_lines():
    text = summarize([f"line {i}" for i in range(MAX_LINES + 5)], "head")
    assert text.startswith("head:") and "line 0" in text and "... and 5 more" in text
    assert f"line {MAX_LINES}" not in text


def test_tcp_hello_mismatch_reported_by_a_peer_that_reads_slowly(monkeypatch):
    """Rank 0 hosts the store: failing the start-up must not drop it while a peer is still
    reading the hellos (that peer would report a lost store instead of the mismatch)."""
    import torch.distributed as dist

    real = dist.TCPStore

    class SlowPeerStore:
        def __init__(self, *args, is_master=False, **kwargs):
            self._store = real(*args, is_master=is_master, **kwargs)
            self._slow = not is_master

        def get(self, key):
            if self._slow:
                time.sleep(0.3)
            return self._store.get(key)

        def __getattr__(self, name):
            return getattr(self._store, name)

    monkeypatch.setattr(dist, "TCPStore", SlowPeerStore)
    port = _port()
    results = _threads(2, lambda r: TcpGroupComm(
        _cfg(2, contention_opt=(r == 1)), r, "127.0.0.1", port))
    for res in results:
        assert isinstance(res, DwdpMismatchError), res
