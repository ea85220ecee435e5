"""Descriptors passed between processes over the abstract unix socket: same bytes on the other
side, batches past one message, clear errors (no server, unknown key, closed server), and no
descriptor left open on either side."""
import os
import subprocess
import sys
import textwrap

import pytest

from tensorrt_llm_dwdp.transport.fd_passing import (MAX_FDS_PER_MESSAGE, FdPassingError, FdServer,
                                                    receive_fds)


def _open_fds() -> set:
    return set(os.listdir("/proc/self/fd"))


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("fdtest")
    os.write(fd, data)
    return fd


def test_in_process_round_trip_and_batches():
    before = _open_fds()
    server = FdServer()
    fds = [_memfd(f"payload {i}".encode()) for i in range(MAX_FDS_PER_MESSAGE + 7)]
    for i, fd in enumerate(fds):
        server.add(f"k{i}", fd)
        os.close(fd)  # the server keeps its own duplicate
    keys = [f"k{i}" for i in reversed(range(len(fds)))]
    got = receive_fds(server.address, keys)
    try:
        for key, fd in zip(keys, got):
            assert os.pread(fd, 64, 0) == f"payload {key[1:]}".encode()
    finally:
        for fd in got:
            os.close(fd)
        server.close()
    assert server.served == len(fds)
    assert _open_fds() == before


def test_errors_name_the_cause_and_leave_nothing_open():
    before = _open_fds()
    server = FdServer()
    fd = _memfd(b"x")
    server.add("present", fd)
    os.close(fd)
    with pytest.raises(FdPassingError, match=r"serves no descriptor \['absent'\]"):
        receive_fds(server.address, ["present", "absent"])
    with pytest.raises(ValueError, match="already served"):
        server.add("present", 0)
    address = server.address
    server.close()
    server.close()  # idempotent
    with pytest.raises(FdPassingError, match="network namespace"):
        receive_fds(address, ["present"], timeout_s=2)
    with pytest.raises(FdPassingError, match="cannot reach"):
        receive_fds("trtllm_dwdp.nobody.0", ["k"], timeout_s=2)
    assert _open_fds() == before


def test_across_processes():
    server = FdServer()
    fd = _memfd(b"from the parent")
    server.add("weights", fd)
    os.close(fd)
    child = textwrap.dedent(f"""
        import os
        from tensorrt_llm_dwdp.transport.fd_passing import receive_fds
        (fd,) = receive_fds({server.address!r}, ["weights"])
        print(os.pread(fd, 64, 0).decode())
    """)
    try:
        out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                             timeout=60)
    finally:
        server.close()
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "from the parent"
