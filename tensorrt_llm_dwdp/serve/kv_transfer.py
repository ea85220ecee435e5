"""KV hand-over between a context server and a generation server: same-node fast path or HTTP.

When a ``context_only`` request finishes prefill, the context server keeps its exported KV
(``Engine.export_kv``: a ``KvHandoff`` packed in one buffer on the engine's device) in a
``KvStore`` under a random one-time id, and its answer carries ``kv_url =
http://<ctx>/v1/kv/<id>``. The generation server pulls it (``kv_puller.KvPuller``):

1. ``POST <kv_url>/share {"host", "kinds"}``: when both servers run on the same node (same
   hostname and boot id) the context server describes where the bytes are: a CUDA IPC handle
   of the buffer (``cuda_ipc``, the context's KV still on its GPU; a generation server on a
   GPU asks for it) or a POSIX shared-memory file holding a copy (``shm``, CPU ranks). The
   entry's lifetime is extended, but it stays the context server's.
2. The generation server maps the handle (or opens the file), copies the bytes into its own
   memory in one memcpy, closes the mapping and sends ``DELETE <kv_url>``: the context server
   frees the entry (and unlinks the file).
3. Otherwise, or when any step of 1-2 fails (a handle that cannot be opened, another node, no
   room in /dev/shm), it falls back to ``GET <kv_url>``: the safetensors bytes over HTTP, the
   entry removed as it is served. A fallback is logged with its reason and counted.

This module is the owner's side (``KvStore``, ``export_share``, ``KvRoutes``); ``kv_puller``
the generation server's.

Entries nobody collects expire after ``ttl_s``; the store is bounded in bytes; its shared files
are unlinked on ``close`` and files left by a crashed server are removed at the next start.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import os
import secrets
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import torch

from tensorrt_llm_dwdp.engine.kv_handoff import KvHandoff

logger = logging.getLogger(__name__)

KV_ROUTE = "/v1/kv/{kv_id}"
KV_SHARE_ROUTE = "/v1/kv/{kv_id}/share"
SHM_DIR = "/dev/shm"
SHM_PREFIX = "trtllm_dwdp_kv_"
# Kept free in /dev/shm beyond a shared copy, so a full tmpfs fails our check, not a write.
SHM_HEADROOM_BYTES = 64 << 20


@lru_cache(maxsize=1)
def host_id() -> str:
    """This node's identity for the same-node check: hostname and kernel boot id."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = "no-boot-id"
    return f"{socket.gethostname()}/{boot}"


class ShareUnavailable(RuntimeError):
    """The context server cannot offer the fast path for this entry (HTTP still works)."""


@dataclass
class _Share:
    """A fast-path export of one entry; ``release`` undoes it (unlinks the shm file)."""

    descriptor: dict[str, Any]
    release: Callable[[], None]


@dataclass
class _Entry:
    handoff: KvHandoff
    nbytes: int
    expires_at: float
    share: _Share | None = None


def export_share(handoff: KvHandoff, kinds: list[str]) -> _Share:
    """Describe ``handoff``'s bytes for a process on this node: the first of ``kinds`` possible.

    ``cuda_ipc``: the packed buffer is on a GPU; its allocation's IPC handle and the offset.
    ``shm``: a copy of the bytes in a new file under /dev/shm (from any device).
    """
    packed = handoff.pack()
    common = {"nbytes": packed.flat.numel(), "layout": [s.to_json() for s in packed.layout],
              "metadata": packed.metadata()}
    reasons = []
    for kind in kinds:
        if kind == "cuda_ipc" and packed.flat.device.type == "cuda":
            from tensorrt_llm_dwdp.transport.cuda_ipc import CudaIpcTransport, check, cuda_bindings

            try:
                rt, _ = cuda_bindings()
                with torch.cuda.device(packed.flat.device):
                    # A worker thread may have no current CUDA context yet, and the export's
                    # cuMemGetAddressRange (driver API) needs one: a runtime call binds it.
                    check(rt.cudaFree(0), "cudaFree(0)")
                record = CudaIpcTransport(packed.flat.device).export(packed.flat)
            except Exception as exc:  # no cuda.bindings, memory not IPC-capable
                reasons.append(f"cuda_ipc: {exc}")
                continue
            ipc = {"allocation": record.allocation, "handle": base64.b64encode(record.handle).decode(),
                   "allocation_bytes": record.allocation_bytes, "offset": record.offset,
                   "device": record.device}
            # The buffer stays referenced by the store's entry until it is released.
            return _Share({**common, "kind": kind, "ipc": ipc}, lambda: None)
        if kind == "shm":
            try:
                path = _write_shm(packed.flat)
            except (OSError, ShareUnavailable) as exc:
                reasons.append(f"shm: {exc}")
                continue
            return _Share({**common, "kind": kind, "path": path}, lambda: _unlink(path))
        reasons.append(f"{kind}: not offered for a buffer on {packed.flat.device}")
    raise ShareUnavailable("; ".join(reasons) or "no transfer kind requested")


def _write_shm(flat: torch.Tensor) -> str:
    nbytes = flat.numel()
    st = os.statvfs(SHM_DIR)
    if st.f_bavail * st.f_frsize < nbytes + SHM_HEADROOM_BYTES:
        raise ShareUnavailable(f"{SHM_DIR} has {st.f_bavail * st.f_frsize} bytes free, "
                               f"{nbytes} needed (plus {SHM_HEADROOM_BYTES} headroom)")
    path = os.path.join(SHM_DIR, f"{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(8)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(flat.cpu().numpy()))
    except BaseException:
        _unlink(path)
        raise
    return path


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_stale_shm_files() -> int:
    """Unlink shared KV files whose owner process is gone (a context server that crashed)."""
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(SHM_PREFIX):
            continue
        try:
            pid = int(name[len(SHM_PREFIX):].split("_", 1)[0])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            _unlink(os.path.join(SHM_DIR, name))
            removed += 1
        except PermissionError:  # alive, someone else's
            continue
    if removed:
        logger.warning("removed %d shared KV file(s) left in %s by exited servers", removed, SHM_DIR)
    return removed


class KvStore:
    """One-time KV hand-offs by id, with a time-to-live and a total byte budget.

    Only the event-loop thread calls it. ``put`` refuses (raises) an entry that cannot fit even
    after dropping expired entries, so a burst of uncollected hand-overs turns into clear
    errors, not an out-of-memory kill.
    """

    def __init__(self, ttl_s: float = 120.0, max_bytes: int = 8 << 30,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s <= 0 or max_bytes <= 0:
            raise ValueError(f"ttl_s={ttl_s} and max_bytes={max_bytes} must be positive")
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.nbytes = 0
        self.served = 0
        self.expired = 0
        remove_stale_shm_files()

    def put(self, handoff: KvHandoff) -> str:
        self.expire()
        nbytes = handoff.nbytes
        if self.nbytes + nbytes > self.max_bytes:
            raise MemoryError(
                f"KV store full: {self.nbytes} bytes held + {nbytes} new > max_bytes={self.max_bytes}; "
                f"generation servers are not collecting hand-overs"
            )
        kv_id = secrets.token_urlsafe(16)
        self._entries[kv_id] = _Entry(handoff, nbytes, self._clock() + self.ttl_s)
        self.nbytes += nbytes
        return kv_id

    def get(self, kv_id: str) -> KvHandoff | None:
        """The entry, left in place with a fresh time-to-live (a peer is about to copy it)."""
        self.expire()
        entry = self._entries.get(kv_id)
        if entry is None:
            return None
        entry.expires_at = self._clock() + self.ttl_s
        self._entries.move_to_end(kv_id)  # keeps the expiry order
        return entry.handoff

    def attach_share(self, kv_id: str, share: _Share) -> _Share | None:
        """Record a fast-path export of ``kv_id`` and return the entry's share (an earlier one
        wins a race); None, with ``share`` released, when the entry is gone."""
        entry = self._entries.get(kv_id)
        if entry is None or entry.share is not None:
            share.release()
            return entry.share if entry is not None else None
        entry.share = share
        return share

    def share_of(self, kv_id: str) -> _Share | None:
        entry = self._entries.get(kv_id)
        return entry.share if entry is not None else None

    def take(self, kv_id: str) -> KvHandoff | None:
        """Remove and return the hand-off (None when unknown, already taken or expired)."""
        self.expire()
        entry = self._drop(kv_id)
        if entry is None:
            return None
        self.served += 1
        return entry.handoff

    def discard(self, kv_id: str) -> bool:
        return self._drop(kv_id) is not None

    def expire(self) -> int:
        now = self._clock()
        dropped = 0
        while self._entries:
            kv_id, entry = next(iter(self._entries.items()))
            if entry.expires_at > now:
                break
            self._drop(kv_id)
            dropped += 1
        if dropped:
            self.expired += dropped
            logger.warning("dropped %d KV hand-over(s) nobody collected within %.0f s", dropped, self.ttl_s)
        return dropped

    def close(self) -> None:
        for kv_id in list(self._entries):
            self._drop(kv_id)

    def _drop(self, kv_id: str) -> _Entry | None:
        entry = self._entries.pop(kv_id, None)
        if entry is None:
            return None
        self.nbytes -= entry.nbytes
        if entry.share is not None:
            entry.share.release()
        return entry

    def __len__(self) -> int:
        return len(self._entries)


class KvRoutes:
    """The context server's side: ``GET`` / ``DELETE`` ``/v1/kv/{id}`` and ``POST .../share``.

    ``on_request(endpoint, status)`` is told about every answer (metrics); ``host`` is this
    node's identity (``host_id()``), compared with the one a share request names.
    """

    def __init__(self, store: KvStore, on_request: Callable[[str, int], None] = lambda e, s: None,
                 host: str | None = None) -> None:
        self.store = store
        self.host = host or host_id()
        self._on_request = on_request

    def add_to(self, app) -> None:
        app.router.add_get(KV_ROUTE, self.get)
        app.router.add_delete(KV_ROUTE, self.delete)
        app.router.add_post(KV_SHARE_ROUTE, self.share)

    async def get(self, request):
        from aiohttp import web

        handoff = self.store.take(request.match_info["kv_id"])
        if handoff is None:
            return self._answer("/v1/kv", _not_found())
        blob = await asyncio.get_running_loop().run_in_executor(None, handoff.to_bytes)
        return self._answer("/v1/kv", web.Response(body=blob, content_type="application/octet-stream"))

    async def delete(self, request):
        from aiohttp import web

        found = self.store.discard(request.match_info["kv_id"])
        return self._answer("/v1/kv", web.json_response({"deleted": found}, status=200 if found else 404))

    async def share(self, request):
        from aiohttp import web

        from tensorrt_llm_dwdp.serve.protocol import ApiError

        kv_id = request.match_info["kv_id"]
        try:
            body = await request.json()
            host, kinds = body["host"], body["kinds"]
            if not isinstance(host, str) or not isinstance(kinds, list):
                raise ValueError("'host' must be a string and 'kinds' a list")
        except (ValueError, KeyError, TypeError) as exc:
            return self._answer("/v1/kv/share", _error(ApiError(
                f"share request must be {{'host': str, 'kinds': [str]}}: {exc}", param="kinds")))
        handoff = self.store.get(kv_id)
        if handoff is None:
            return self._answer("/v1/kv/share", _not_found())
        if host != self.host:
            return self._answer("/v1/kv/share", _unavailable(f"another node ({host} is not {self.host})"))
        existing = self.store.share_of(kv_id)
        if existing is not None:
            return self._answer("/v1/kv/share", web.json_response(existing.descriptor))
        try:
            share = await asyncio.get_running_loop().run_in_executor(None, export_share, handoff, kinds)
        except ShareUnavailable as exc:
            return self._answer("/v1/kv/share", _unavailable(str(exc)))
        share = self.store.attach_share(kv_id, share)
        if share is None:
            return self._answer("/v1/kv/share", _not_found())
        return self._answer("/v1/kv/share", web.json_response(share.descriptor))

    def _answer(self, endpoint: str, resp):
        self._on_request(endpoint, resp.status)
        return resp


def _error(e):
    from aiohttp import web

    return web.json_response(e.body(), status=e.status)


def _not_found():
    from tensorrt_llm_dwdp.serve.protocol import ApiError

    return _error(ApiError("unknown or already collected KV id", status=404, type="not_found_error",
                           param="kv_id"))


def _unavailable(reason: str):
    from tensorrt_llm_dwdp.serve.protocol import ApiError

    return _error(ApiError(f"same-node KV transfer unavailable: {reason}", status=409,
                           type="invalid_request_error", code="kv_share_unavailable"))


class KvFetchError(RuntimeError):
    """The generation server could not pull the KV of a context-only request."""
