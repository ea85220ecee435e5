"""The generation server's side of the KV hand-over (the protocol: ``kv_transfer``).

``KvPuller.pull(session, kv_url)`` asks the owner to share the entry, copies it out of the
owner's export pool (``kv_pool``) and releases it, or falls back to HTTP, and says which way it
went and how long each phase took. A context server's pool is mapped once (its CUDA IPC handle
opened, or its /dev/shm file mapped) and kept for the next hand-overs, keyed by the server's
address; a share answer naming another pool or incarnation (the server restarted) closes the
old mapping and opens the new one. ``close`` unmaps everything.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import ctypes
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from tensorrt_llm_dwdp.engine.kv_handoff import KvHandoff, KvTensorSpec, check_metadata
from tensorrt_llm_dwdp.serve.kv_pool import SHM_DIR, SHM_PREFIX
from tensorrt_llm_dwdp.serve.kv_transfer import SHARE_REASONS, KvFetchError, host_id
from tensorrt_llm_dwdp.transport.base import HandleRecord, Transport

logger = logging.getLogger(__name__)

# Why a hand-over left the fast path: the owner's refusals, then the puller's own failures.
FALLBACK_REASONS = (*SHARE_REASONS, "share_error", "map_error", "copy_error")


@dataclass(frozen=True)
class KvTransfer:
    """How one hand-over travelled: ``path`` is cuda_ipc, shm or http; ``reason`` (one of
    ``FALLBACK_REASONS``) and ``fallback`` (the message) say why the fast path was not taken
    (None when it was, or when it was off). ``phases``: seconds of the fast path's ``share_s``,
    ``open_s`` (mapping the owner's pool: ``opened`` says whether it was opened now or reused),
    ``alloc_s``, ``copy_s`` and ``release_s``."""

    path: str
    nbytes: int
    seconds: float
    fallback: str | None = None
    reason: str | None = None
    phases: Mapping[str, float] = field(default_factory=dict)
    opened: bool = False


@dataclass
class _Mapping:
    """One context server's export pool, mapped in this process."""

    kind: str
    pool_id: str
    incarnation: str
    nbytes: int
    transport: Transport
    peer: int
    record: HandleRecord
    base: int  # address of the pool's first byte here


class KvPuller:
    """The generation server's side: pulls a hand-over into memory this process owns.

    ``device`` is where the engine runs: a CUDA device asks for ``cuda_ipc`` first (the bytes
    land on it in one device-to-device copy), any device can read ``shm``. ``fast_path=False``
    always uses HTTP. Mapping and copies run on one worker thread.
    """

    def __init__(self, device: torch.device | str = "cpu", *, fast_path: bool = True,
                 timeout_s: float = 60.0) -> None:
        self.device = torch.device(device)
        self.fast_path = fast_path
        self.timeout_s = timeout_s
        self.kinds = (["cuda_ipc", "shm"] if self.device.type == "cuda" else ["shm"]) if fast_path else []
        self.opened = 0  # pools mapped so far (first hand-over from a server, or after its restart)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kv-pull")
        self._mappings: dict[str, _Mapping] = {}  # context server address -> its pool
        self._transports: dict[str, Transport] = {}
        self._next_peer = 0

    @property
    def mapped_pools(self) -> int:
        return len(self._mappings)

    async def pull(self, session, kv_url: str) -> tuple[KvHandoff, KvTransfer]:
        """The hand-over at ``kv_url``; raises ``KvFetchError`` naming the URL and cause."""
        import aiohttp

        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        reason = message = None
        if self.kinds:
            try:
                handoff, phases, opened, kind = await self._pull_shared(session, kv_url)
            except _Fallback as exc:
                reason, message = exc.reason, str(exc)
            else:
                t = time.perf_counter()
                await self._release(session, kv_url)
                phases["release_s"] = time.perf_counter() - t
                return handoff, KvTransfer(kind, handoff.nbytes, time.perf_counter() - start,
                                           phases=phases, opened=opened)
            logger.warning("KV %s over HTTP (%s): %s", kv_url, reason, message)
        try:
            async with session.get(kv_url, timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                if resp.status != 200:
                    detail = (await resp.text())[:300]
                    raise KvFetchError(f"KV fetch {kv_url} answered HTTP {resp.status}: {detail}")
                blob = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise KvFetchError(f"KV fetch {kv_url} failed: {type(e).__name__}: {e}") from e
        try:
            handoff = await loop.run_in_executor(self._pool, KvHandoff.from_bytes, blob)
        except ValueError as e:
            raise KvFetchError(f"KV fetch {kv_url}: {e}") from e
        return handoff, KvTransfer("http", handoff.nbytes, time.perf_counter() - start, message, reason)

    async def _pull_shared(self, session, kv_url: str) -> tuple[KvHandoff, dict[str, float], bool, str]:
        """Share and copy (not yet released); ``_Fallback`` when HTTP should be used instead."""
        start = time.perf_counter()
        desc = await self._share(session, kv_url)
        share_s = time.perf_counter() - start
        try:
            handoff, phases, opened = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._copy, desc, _owner(kv_url))
        except _Fallback:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the copy: use HTTP
            raise _Fallback("copy_error", f"{desc.get('kind')} copy failed: {type(exc).__name__}: {exc}") from exc
        return handoff, {"share_s": share_s, **phases}, opened, desc["kind"]

    async def share_and_map(self, session, kv_url: str) -> tuple[dict[str, Any], int]:
        """The share answer for ``kv_url`` and the address of the entry's first byte in this
        process (its owner's pool mapped as for a pull); the caller copies, then DELETEs."""
        desc = await self._share(session, kv_url)
        mapping, _ = await asyncio.get_running_loop().run_in_executor(
            self._pool, self._map, _owner(kv_url), desc["kind"], desc["pool"])
        return desc, mapping.base + int(desc["pool"]["offset"])

    async def unmap_pools(self) -> None:
        """Unmap every context server's pool now (each is mapped again by its next hand-over)."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self._unmap_all)

    async def _share(self, session, kv_url: str) -> dict[str, Any]:
        import aiohttp

        try:
            async with session.post(kv_url + "/share", json={"host": host_id(), "kinds": self.kinds},
                                    timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                text = await resp.text()
                if resp.status == 404:
                    raise KvFetchError(f"KV fetch {kv_url} answered HTTP 404: {text[:300]}")
                if resp.status == 409:
                    raise _Fallback(_refusal(text), f"share answered HTTP 409: {text[:300]}")
                if resp.status != 200:
                    raise _Fallback("share_error", f"share answered HTTP {resp.status}: {text[:300]}")
                desc = json.loads(text)  # the body read once (resp.json() would copy and decode it again)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise _Fallback("share_error", f"share request failed: {type(e).__name__}: {e}") from e
        if not isinstance(desc, dict) or not isinstance(desc.get("pool"), dict):
            raise _Fallback("share_error", f"share answer names no export pool: {str(desc)[:200]}")
        return desc

    async def _release(self, session, kv_url: str) -> None:
        """Tell the owner the copy is done. Its 200 also proves the entry was still held while
        the bytes were copied (an expired entry's block may hold another's KV by now)."""
        import aiohttp

        try:
            async with session.delete(kv_url, timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as e:
            raise KvFetchError(f"KV {kv_url}: release failed ({type(e).__name__}: {e}): the owner may have "
                               f"freed the entry during the copy, its bytes are not used") from e
        if status != 200:
            raise KvFetchError(f"KV {kv_url}: release answered HTTP {status}: the entry was freed before the "
                               f"copy ended (expired?), its bytes are not used")

    # ---- the worker thread ---------------------------------------------------------------

    def _copy(self, desc: dict[str, Any], owner: str) -> tuple[KvHandoff, dict[str, float], bool]:
        prompt_ids, first_token = check_metadata(desc["metadata"])
        layout = tuple(KvTensorSpec.from_json(d) for d in desc["layout"])
        nbytes, pool = int(desc["nbytes"]), desc["pool"]
        offset = int(pool["offset"])
        if offset < 0 or offset + nbytes > int(pool["bytes"]):
            raise ValueError(f"entry [{offset}, +{nbytes}) lies outside the export pool of {pool['bytes']} bytes")
        t0 = time.perf_counter()
        try:
            mapping, opened = self._map(owner, desc["kind"], pool)
        except Exception as exc:
            raise _Fallback("map_error", f"cannot map the export pool of {owner}: {type(exc).__name__}: {exc}") from exc
        t1 = time.perf_counter()
        try:
            on_gpu = mapping.kind == "cuda_ipc"
            dst = torch.empty(nbytes, dtype=torch.uint8, device=self.device if on_gpu else "cpu")
            t2 = time.perf_counter()
            if on_gpu:
                self._copy_device(dst, mapping.base + offset, nbytes)
            else:
                ctypes.memmove(dst.data_ptr(), mapping.base + offset, nbytes)
        except BaseException:
            self._unmap(owner)  # mapped again on the next hand-over
            raise
        t3 = time.perf_counter()
        phases = {"open_s": t1 - t0, "alloc_s": t2 - t1, "copy_s": t3 - t2}
        return KvHandoff.from_flat(prompt_ids, first_token, dst, layout), phases, opened

    def _copy_device(self, dst: torch.Tensor, src: int, nbytes: int) -> None:
        from tensorrt_llm_dwdp.transport.cuda_ipc import check, cuda_bindings

        rt, _ = cuda_bindings()
        with torch.cuda.device(dst.device):
            stream = torch.cuda.current_stream()
            check(rt.cudaMemcpyAsync(dst.data_ptr(), src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDefault,
                                     stream.cuda_stream), f"cudaMemcpyAsync of {nbytes} KV bytes")
            stream.synchronize()

    def _map(self, owner: str, kind: str, pool: dict[str, Any]) -> tuple[_Mapping, bool]:
        """The mapping of ``owner``'s pool (opened now: True) -- reused while the owner answers
        with the same pool id and incarnation, replaced when it does not."""
        ident = (kind, str(pool["id"]), str(pool["incarnation"]), int(pool["bytes"]))
        old = self._mappings.get(owner)
        if old is not None:
            if (old.kind, old.pool_id, old.incarnation, old.nbytes) == ident:
                return old, False
            logger.info("context server %s now has export pool %s (incarnation %s, was %s): mapping it",
                        owner, ident[1], ident[2], old.incarnation)
            self._unmap(owner)
        record = _record(kind, pool)
        transport = self._transport(kind)
        peer, self._next_peer = self._next_peer, self._next_peer + 1
        base = transport.open(peer, record)
        mapping = self._mappings[owner] = _Mapping(*ident, transport, peer, record, base)
        self.opened += 1
        return mapping, True

    def _unmap(self, owner: str) -> None:
        mapping = self._mappings.pop(owner, None)
        if mapping is None:
            return
        try:
            mapping.transport.release(mapping.peer, mapping.record)
        except Exception as exc:  # noqa: BLE001 - e.g. the owner died; nothing else to undo
            logger.warning("unmapping the export pool of %s failed: %s", owner, exc)

    def _transport(self, kind: str) -> Transport:
        transport = self._transports.get(kind)
        if transport is None:
            if kind == "cuda_ipc":
                from tensorrt_llm_dwdp.transport.cuda_ipc import CudaIpcTransport

                transport = CudaIpcTransport(self.device)
            elif kind == "shm":
                from tensorrt_llm_dwdp.transport.shm import ShmTransport

                transport = ShmTransport()
            else:
                raise ValueError(f"unknown share kind {kind!r}")
            self._transports[kind] = transport
        return transport

    def _unmap_all(self) -> None:
        for owner in list(self._mappings):
            self._unmap(owner)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._unmap_all()
        for transport in self._transports.values():
            transport.close()
        self._transports.clear()


class _Fallback(Exception):
    """The fast path is not available for this pull; HTTP is. ``reason``: FALLBACK_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _owner(kv_url: str) -> str:
    return kv_url.split("/v1/kv/")[0]


def _refusal(text: str) -> str:
    """The reason of a 409 share answer (``code`` ``kv_share_<reason>``)."""
    try:
        code = json.loads(text)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "share_error"
    reason = code[len("kv_share_"):] if isinstance(code, str) and code.startswith("kv_share_") else ""
    return reason if reason in SHARE_REASONS else "share_error"


def _record(kind: str, pool: dict[str, Any]) -> HandleRecord:
    """What the transport of ``kind`` opens for the pool a share answer describes."""
    nbytes = int(pool["bytes"])
    if kind == "cuda_ipc":
        ipc = pool["ipc"]
        record = HandleRecord("cuda_ipc", str(ipc["allocation"]), base64.b64decode(ipc["handle"]),
                              int(ipc["allocation_bytes"]), int(ipc["offset"]), nbytes, int(ipc["device"]))
        if record.offset + nbytes > record.allocation_bytes:
            raise ValueError(f"export pool [{record.offset}, +{nbytes}) exceeds its allocation of "
                             f"{record.allocation_bytes} bytes")
        return record
    if kind == "shm":
        path = str(pool["path"])
        name = os.path.basename(path)
        if os.path.dirname(path) != SHM_DIR or not name.startswith(SHM_PREFIX):
            raise ValueError(f"refusing to map {path!r}: not a shared KV file")
        return HandleRecord("shm", name, name.encode(), nbytes, 0, nbytes)
    raise ValueError(f"unknown share kind {kind!r}")
