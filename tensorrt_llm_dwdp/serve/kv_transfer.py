"""KV hand-over between a context server and a generation server: same-node fast path or HTTP.

When a ``context_only`` request finishes prefill, the context server keeps its exported KV
(``Engine.export_kv``: a ``KvHandoff`` packed in one buffer, normally a block of the server's
export pool, ``kv_pool``) in a ``KvStore`` under a random one-time id, and its answer carries
``kv_url = http://<ctx>/v1/kv/<id>``. The generation server pulls it (``kv_puller.KvPuller``):

1. ``POST <kv_url>/share {"host", "kinds"}``: when both servers run on the same node (same
   hostname and boot id) the context server answers where the bytes are: its pool's identity
   and handle (a CUDA IPC handle, ``cuda_ipc``, or a /dev/shm file, ``shm``) and the entry's
   offset. An entry that is not in the pool yet (it did not fit when prefill ended) is moved
   in first, waiting briefly for room. The entry's lifetime is extended; it stays the context
   server's.
2. The generation server maps the pool (once per context server and pool incarnation), copies
   the entry's bytes into its own memory and sends ``DELETE <kv_url>``: the context server
   frees the block. The answer confirms the entry was held during the copy; without it the
   bytes are not used.
3. Otherwise, or when step 1 or the copy fails (another node, no pool, no room, a handle that
   cannot be opened), it falls back to ``GET <kv_url>``: the safetensors bytes over HTTP, the
   entry removed as it is served. A fallback is logged with its reason and counted.

This module is the owner's side (``KvStore``, ``KvRoutes``); ``kv_puller`` the generation
server's. A refused share answers 409 with ``code`` ``kv_share_<reason>`` (``SHARE_REASONS``).

Entries nobody collects expire after ``ttl_s``; the store is bounded in bytes; a pool's shm
file is unlinked when it closes and files left by a crashed server are removed at the next start.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

from tensorrt_llm_dwdp.engine.kv_handoff import KvHandoff
from tensorrt_llm_dwdp.serve.kv_pool import KvExportPool, remove_stale_shm_files

logger = logging.getLogger(__name__)

KV_ROUTE = "/v1/kv/{kv_id}"
KV_SHARE_ROUTE = "/v1/kv/{kv_id}/share"
# Why a share is refused (409 code kv_share_<reason>); the generation server counts them.
SHARE_REASONS = ("other_node", "no_pool", "kind", "too_large", "pool_full")


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
    """The context server cannot offer the fast path for this entry (HTTP still works);
    ``reason`` is one of ``SHARE_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class _Entry:
    handoff: KvHandoff
    nbytes: int
    expires_at: float
    share: dict[str, Any] | None = None  # the descriptor answered to share requests


def share_descriptor(pool: KvExportPool | None, handoff: KvHandoff, kinds: list[str]) -> tuple[dict, KvHandoff]:
    """Describe ``handoff``'s bytes for a process on this node: ``(descriptor, handoff in the
    pool)``; the second is a new hand-off when the entry had to be moved into the pool (the
    caller keeps it and releases the old one). Raises ``ShareUnavailable``. Blocking (it may
    create the pool, wait for room and copy): run it off the event loop."""
    if pool is None or not pool.ensure():
        why = pool.error if pool is not None else "kv_transfer_pool_bytes is 0"
        raise ShareUnavailable("no_pool", f"this context server has no KV export pool ({why})")
    if pool.kind not in kinds:
        raise ShareUnavailable("kind", f"the export pool is {pool.kind}; the generation server reads {kinds}")
    pooled = handoff
    if not pool.holds(handoff.block):
        pooled = pool.adopt(handoff)  # None at once for an entry that can never fit (counted)
        if pooled is None and handoff.nbytes > pool.capacity:
            raise ShareUnavailable("too_large", f"a KV of {handoff.nbytes} bytes exceeds the export pool "
                                                f"of {pool.capacity} bytes (kv_transfer_pool_bytes)")
        if pooled is None:
            s = pool.allocator.stats()
            raise ShareUnavailable("pool_full", f"no room for {handoff.nbytes} bytes in the export pool "
                                                f"after {pool.wait_s} s ({s['used']} of {s['capacity']} "
                                                f"bytes held by {s['entries']} hand-overs, largest free "
                                                f"range {s['largest_free']})")
    # A hand-off in a pool block is packed: its flat buffer is the block.
    return ({"kind": pool.kind, "nbytes": pooled.flat.numel(), "layout": [s.to_json() for s in pooled.layout],
             "metadata": pooled.metadata(), "pool": pool.describe(pooled.block)}, pooled)


class KvStore:
    """One-time KV hand-offs by id, with a time-to-live and a total byte budget.

    Only the event-loop thread calls it. ``put`` refuses (raises) an entry that cannot fit even
    after dropping expired entries, so a burst of uncollected hand-overs turns into clear
    errors, not an out-of-memory kill. ``pool`` is the server's export pool (None: no fast
    path); an entry's pool block is freed when the entry is discarded, expires or the store
    closes (``take`` hands the entry and its block to the caller).
    """

    def __init__(self, ttl_s: float = 120.0, max_bytes: int = 8 << 30,
                 clock: Callable[[], float] = time.monotonic, pool: KvExportPool | None = None) -> None:
        if ttl_s <= 0 or max_bytes <= 0:
            raise ValueError(f"ttl_s={ttl_s} and max_bytes={max_bytes} must be positive")
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.pool = pool
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

    def attach_share(self, kv_id: str, descriptor: dict[str, Any],
                     adopted: KvHandoff | None = None) -> dict[str, Any] | None:
        """Record the share ``descriptor`` of ``kv_id`` and return the entry's descriptor (an
        earlier one wins a race); None when the entry is gone. ``adopted``: the entry moved into
        the pool, which replaces (and releases) the one it had, or is released if not used."""
        entry = self._entries.get(kv_id)
        if entry is None or entry.share is not None:
            if adopted is not None:
                adopted.release()
            return entry.share if entry is not None else None
        if adopted is not None:
            entry.handoff.release()
            entry.handoff = adopted
        entry.share = descriptor
        return descriptor

    def share_of(self, kv_id: str) -> dict[str, Any] | None:
        entry = self._entries.get(kv_id)
        return entry.share if entry is not None else None

    def take(self, kv_id: str) -> KvHandoff | None:
        """Remove and return the hand-off (None when unknown, already taken or expired); the
        caller releases it when done with its bytes."""
        self.expire()
        entry = self._pop(kv_id)
        if entry is None:
            return None
        self.served += 1
        return entry.handoff

    def discard(self, kv_id: str) -> bool:
        """Free the entry; False when it was unknown, taken or past its time-to-live."""
        self.expire()
        return self._drop(kv_id)

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

    def _pop(self, kv_id: str) -> _Entry | None:
        entry = self._entries.pop(kv_id, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
        return entry

    def _drop(self, kv_id: str) -> bool:
        entry = self._pop(kv_id)
        if entry is None:
            return False
        entry.handoff.release()
        return True

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
        try:
            blob = await asyncio.get_running_loop().run_in_executor(None, handoff.to_bytes)
        finally:
            handoff.release()
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
            return self._answer("/v1/kv/share", _unavailable(ShareUnavailable(
                "other_node", f"another node ({host} is not {self.host})")))
        existing = self.store.share_of(kv_id)
        if existing is not None:
            return self._answer("/v1/kv/share", web.json_response(existing))
        try:
            descriptor, pooled = await asyncio.get_running_loop().run_in_executor(
                None, share_descriptor, self.store.pool, handoff, kinds)
        except ShareUnavailable as exc:
            if exc.reason in ("pool_full", "too_large"):
                logger.warning("KV %s goes over HTTP: %s", kv_id, exc)
            return self._answer("/v1/kv/share", _unavailable(exc))
        descriptor = self.store.attach_share(kv_id, descriptor, pooled if pooled is not handoff else None)
        if descriptor is None:
            return self._answer("/v1/kv/share", _not_found())
        return self._answer("/v1/kv/share", web.json_response(descriptor))

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


def _unavailable(exc: ShareUnavailable):
    from tensorrt_llm_dwdp.serve.protocol import ApiError

    return _error(ApiError(f"same-node KV transfer unavailable: {exc}", status=409,
                           type="invalid_request_error", code=f"kv_share_{exc.reason}"))


class KvFetchError(RuntimeError):
    """The generation server could not pull the KV of a context-only request."""
