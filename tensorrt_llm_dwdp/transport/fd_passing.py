"""File descriptors handed between processes of one host over a unix socket (SCM_RIGHTS).

Why a socket and not ``pidfd_getfd``: ``pidfd_getfd`` needs ptrace rights over the exporting
process, which Yama (``ptrace_scope`` 1, the Ubuntu default) refuses between sibling ranks and
the default container seccomp profile refuses without CAP_SYS_PTRACE. Passing the descriptor
over a unix socket needs no privilege; it needs the ranks to share a network namespace (the
socket lives in Linux's abstract namespace, so nothing is created on disk) -- true for ranks
of one container or pod. A peer that cannot connect gets an error that says so.

``FdServer`` serves this process's descriptors by key from a daemon thread, only to processes
of the same user (``SO_PEERCRED``); ``receive_fds(address, keys)`` fetches duplicates of them.
Protocol: the client sends ``keys`` as one JSON list; the server answers with one JSON status
message carrying the descriptors as ancillary data, ``{"ok": true}`` or ``{"error": text}``.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import struct
import threading
from typing import Iterable

logger = logging.getLogger(__name__)

MAX_FDS_PER_MESSAGE = 200  # SCM_MAX_FD is 253 on Linux
_ACCEPT_WAKE_S = 0.2
_MAX_REQUEST = 1 << 20


class FdPassingError(RuntimeError):
    """A descriptor could not be passed between local ranks; the message says why and how."""


def _send_msg(sock: socket.socket, payload: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(payload).encode()
    header = struct.pack("<I", len(data))
    if fds:
        socket.send_fds(sock, [header + data], fds)
    else:
        sock.sendall(header + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise ConnectionError(f"connection closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv_msg(sock: socket.socket, max_fds: int = 0) -> tuple[dict, list[int]]:
    if max_fds:
        data, fds, _, _ = socket.recv_fds(sock, _MAX_REQUEST + 4, max_fds)
    else:
        data, fds = sock.recv(_MAX_REQUEST + 4), []
    if len(data) < 4:
        for fd in fds:
            os.close(fd)
        raise ConnectionError("short message")
    (size,) = struct.unpack("<I", data[:4])
    body = data[4:]
    if len(body) < size:
        body += _recv_exact(sock, size - len(body))
    return json.loads(body[:size]), list(fds)


class FdServer:
    """Serves registered descriptors to same-user processes until ``close()``.

    The server keeps its own duplicates of the registered descriptors and closes them on
    ``close()``; callers may close theirs at once.
    """

    def __init__(self, label: str = "trtllm_dwdp") -> None:
        self.address = f"{label}.{os.getpid()}.{secrets.token_hex(8)}"
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind("\0" + self.address)
            self._sock.listen(64)
            self._sock.settimeout(_ACCEPT_WAKE_S)
        except OSError:
            self._sock.close()
            raise
        self.served = 0
        self._thread = threading.Thread(target=self._serve, name="dwdp-fd-server", daemon=True)
        self._thread.start()

    def add(self, key: str, fd: int) -> None:
        """Serve a duplicate of ``fd`` under ``key`` (``fd`` stays the caller's)."""
        with self._lock:
            if self._closed.is_set():
                raise FdPassingError("FdServer.add after close")
            if key in self._fds:
                raise ValueError(f"descriptor key {key!r} is already served")
            self._fds[key] = os.dup(fd)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._fds

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                if self._closed.is_set():
                    return
                raise
            with conn:
                try:
                    self._answer(conn)
                except Exception as exc:  # a broken client must not stop the server
                    logger.warning("DWDP fd server: request failed: %s", exc)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(10.0)
        pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
        if uid != os.getuid():
            _send_msg(conn, {"error": f"process {pid} runs as uid {uid}, the exporter as "
                                      f"uid {os.getuid()}; ranks must run as one user"})
            return
        request, _ = _recv_msg(conn)
        keys = request.get("keys") if isinstance(request, dict) else None
        if not isinstance(keys, list) or len(keys) > MAX_FDS_PER_MESSAGE:
            _send_msg(conn, {"error": f"bad request {request!r:.200}"})
            return
        with self._lock:
            missing = [k for k in keys if k not in self._fds]
            fds = [self._fds[k] for k in keys if k in self._fds]
        if missing:
            _send_msg(conn, {"error": f"process {os.getpid()} serves no descriptor "
                                      f"{missing[:4]} ({len(self._fds)} served)"})
            return
        _send_msg(conn, {"ok": True, "count": len(fds)}, fds)
        self.served += len(fds)

    def close(self) -> None:
        """Stop serving and close the server's duplicates (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._sock.close()
        self._thread.join()
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def receive_fds(address: str, keys: Iterable[str], timeout_s: float = 30.0) -> list[int]:
    """Duplicates of the descriptors ``address`` serves under ``keys``, in order.

    The caller owns (and must close) the returned descriptors. Raises FdPassingError with the
    reason (no such server, other user, unknown key, timeout); nothing stays open then.
    """
    keys = list(keys)
    out: list[int] = []
    try:
        for first in range(0, len(keys), MAX_FDS_PER_MESSAGE):
            batch = keys[first:first + MAX_FDS_PER_MESSAGE]
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout_s)
                try:
                    sock.connect("\0" + address)
                except OSError as exc:
                    raise FdPassingError(
                        f"cannot reach the descriptor server @{address} ({exc}); local ranks "
                        "pass memory handles over an abstract unix socket, so they must run on "
                        "one host in one network namespace (same container or pod) and the "
                        "exporting rank must still be in its exchange") from exc
                try:
                    _send_msg(sock, {"keys": batch})
                    reply, fds = _recv_msg(sock, max_fds=len(batch))
                except (OSError, ValueError) as exc:
                    raise FdPassingError(f"descriptor server @{address} did not answer: "
                                         f"{type(exc).__name__}: {exc}") from exc
                out.extend(fds)
                if "error" in reply:
                    raise FdPassingError(f"descriptor server @{address} refused: {reply['error']}")
                if len(fds) != len(batch):
                    raise FdPassingError(f"descriptor server @{address} sent {len(fds)} "
                                         f"descriptor(s) for {len(batch)} key(s)")
    except BaseException:
        for fd in out:
            os.close(fd)
        raise
    return out
