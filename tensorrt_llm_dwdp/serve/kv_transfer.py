"""KV hand-over between a context server and a generation server, over HTTP.

Mechanism: when a ``context_only`` request finishes prefill, the context server exports its KV
(``Engine.export_kv`` -> ``KvHandoff.to_bytes()``, safetensors bytes on the host) and keeps the
bytes here under a random one-time id. Its answer carries ``kv_url =
http://<ctx host>:<port>/v1/kv/<id>``. The generation server GETs that URL (the entry is removed
as it is served) and imports the KV with ``KvHandoff.from_bytes`` before decoding. On GPUs the
bytes pass through host memory on both sides; this works across nodes and on CPU ranks alike.
Entries nobody collects expire after ``ttl_s`` and the store is bounded in bytes, so a router
that dies between the two phases leaks nothing for long.
"""
from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

logger = logging.getLogger(__name__)

KV_ROUTE = "/v1/kv/{kv_id}"


@dataclass(frozen=True)
class _Entry:
    data: bytes
    expires_at: float


class KvStore:
    """One-time KV blobs by id, with a time-to-live and a total byte budget.

    ``put`` refuses (raises) a blob that cannot fit even after dropping expired entries,
    so a burst of uncollected hand-overs turns into clear errors, not an out-of-memory kill.
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

    def put(self, data: bytes) -> str:
        self.expire()
        if self.nbytes + len(data) > self.max_bytes:
            raise MemoryError(
                f"KV store full: {self.nbytes} bytes held + {len(data)} new > max_bytes={self.max_bytes}; "
                f"generation servers are not collecting hand-overs"
            )
        kv_id = secrets.token_urlsafe(16)
        self._entries[kv_id] = _Entry(data, self._clock() + self.ttl_s)
        self.nbytes += len(data)
        return kv_id

    def take(self, kv_id: str) -> bytes | None:
        """Remove and return the blob (None when unknown, already taken or expired)."""
        self.expire()
        entry = self._entries.pop(kv_id, None)
        if entry is None:
            return None
        self.nbytes -= len(entry.data)
        self.served += 1
        return entry.data

    def discard(self, kv_id: str) -> bool:
        entry = self._entries.pop(kv_id, None)
        if entry is not None:
            self.nbytes -= len(entry.data)
        return entry is not None

    def expire(self) -> int:
        now = self._clock()
        dropped = 0
        while self._entries:
            kv_id, entry = next(iter(self._entries.items()))
            if entry.expires_at > now:
                break
            self._entries.popitem(last=False)
            self.nbytes -= len(entry.data)
            dropped += 1
        if dropped:
            self.expired += dropped
            logger.warning("dropped %d KV hand-over(s) nobody collected within %.0f s", dropped, self.ttl_s)
        return dropped

    def __len__(self) -> int:
        return len(self._entries)


async def fetch_kv(session, url: str, timeout_s: float) -> bytes:
    """GET a KV blob from a context server; raises ``KvFetchError`` naming the URL and status."""
    import aiohttp

    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                detail = (await resp.text())[:300]
                raise KvFetchError(f"KV fetch {url} answered HTTP {resp.status}: {detail}")
            return await resp.read()
    except (aiohttp.ClientError, TimeoutError) as e:
        raise KvFetchError(f"KV fetch {url} failed: {type(e).__name__}: {e}") from e


class KvFetchError(RuntimeError):
    """The generation server could not pull the KV of a context-only request."""
