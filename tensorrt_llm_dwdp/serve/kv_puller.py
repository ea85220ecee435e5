"""The generation server's side of the KV hand-over (the protocol: ``kv_transfer``).

``KvPuller.pull(session, kv_url)`` asks the owner to share the entry, copies it in one memcpy
(CUDA IPC or /dev/shm) and releases it, or falls back to HTTP, and says which way it went.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from tensorrt_llm_dwdp.engine.kv_handoff import KvHandoff, KvTensorSpec, check_metadata
from tensorrt_llm_dwdp.serve.kv_transfer import SHM_DIR, SHM_PREFIX, KvFetchError, host_id

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KvTransfer:
    """How one hand-over travelled: ``path`` is cuda_ipc, shm or http; ``fallback`` the reason
    the fast path was not taken (None when it was, or when it was off)."""

    path: str
    nbytes: int
    seconds: float
    fallback: str | None = None


class KvPuller:
    """The generation server's side: pulls a hand-over into memory this process owns.

    ``device`` is where the engine runs: a CUDA device asks for ``cuda_ipc`` first (the bytes
    land on it in one device-to-device copy), any device can read ``shm``. ``fast_path=False``
    always uses HTTP. Copies run on one worker thread (mapped handles are not shared between
    threads); ``close`` unmaps anything still mapped.
    """

    def __init__(self, device: torch.device | str = "cpu", *, fast_path: bool = True,
                 timeout_s: float = 60.0) -> None:
        self.device = torch.device(device)
        self.fast_path = fast_path
        self.timeout_s = timeout_s
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kv-pull")
        self._transport = None  # CudaIpcTransport, made on first use
        self._peers: dict[str, int] = {}
        self.kinds = (["cuda_ipc", "shm"] if self.device.type == "cuda" else ["shm"]) if fast_path else []

    async def pull(self, session, kv_url: str) -> tuple[KvHandoff, KvTransfer]:
        """The hand-over at ``kv_url``; raises ``KvFetchError`` naming the URL and cause."""
        import aiohttp

        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        reason = None
        if self.kinds:
            try:
                desc = await self._share(session, kv_url)
            except _Fallback as exc:
                reason = str(exc)
            else:
                try:
                    handoff = await loop.run_in_executor(self._pool, self._copy, desc, kv_url)
                except Exception as exc:  # noqa: BLE001 - any failure of the fast path: use HTTP
                    reason = f"{desc['kind']} copy failed: {type(exc).__name__}: {exc}"
                else:
                    await self._delete(session, kv_url)
                    return handoff, KvTransfer(desc["kind"], handoff.nbytes, time.perf_counter() - start)
            logger.warning("KV %s over HTTP: %s", kv_url, reason)
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
        return handoff, KvTransfer("http", handoff.nbytes, time.perf_counter() - start, reason)

    async def _share(self, session, kv_url: str) -> dict[str, Any]:
        import aiohttp

        try:
            async with session.post(kv_url + "/share", json={"host": host_id(), "kinds": self.kinds},
                                    timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                if resp.status == 404:
                    raise KvFetchError(f"KV fetch {kv_url} answered HTTP 404: "
                                       f"{(await resp.text())[:300]}")
                if resp.status != 200:
                    raise _Fallback(f"share answered HTTP {resp.status}: {(await resp.text())[:300]}")
                return await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise _Fallback(f"share request failed: {type(e).__name__}: {e}") from e

    async def _delete(self, session, kv_url: str) -> None:
        """Tell the owner the copy is done; if that fails its time-to-live frees the entry."""
        import aiohttp

        try:
            async with session.delete(kv_url, timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                if resp.status != 200:
                    logger.warning("KV %s: release answered HTTP %d", kv_url, resp.status)
        except (aiohttp.ClientError, TimeoutError) as e:
            logger.warning("KV %s: release failed (%r); the entry expires on its own", kv_url, e)

    # ---- the worker thread ---------------------------------------------------------------

    def _copy(self, desc: dict[str, Any], kv_url: str) -> KvHandoff:
        prompt_ids, first_token = check_metadata(desc["metadata"])
        layout = tuple(KvTensorSpec.from_json(d) for d in desc["layout"])
        nbytes = int(desc["nbytes"])
        if desc["kind"] == "cuda_ipc":
            flat = self._copy_ipc(desc["ipc"], nbytes, kv_url)
        elif desc["kind"] == "shm":
            flat = _read_shm(desc["path"], nbytes)
        else:
            raise ValueError(f"unknown share kind {desc['kind']!r}")
        return KvHandoff.from_flat(prompt_ids, first_token, flat, layout)

    def _copy_ipc(self, ipc: dict[str, Any], nbytes: int, kv_url: str) -> torch.Tensor:
        from tensorrt_llm_dwdp.transport.base import HandleRecord
        from tensorrt_llm_dwdp.transport.cuda_ipc import CudaIpcTransport, check, cuda_bindings

        if self._transport is None:
            self._transport = CudaIpcTransport(self.device)
        transport = self._transport
        record = HandleRecord("cuda_ipc", str(ipc["allocation"]), base64.b64decode(ipc["handle"]),
                              int(ipc["allocation_bytes"]), int(ipc["offset"]), nbytes, int(ipc["device"]))
        if record.offset + nbytes > record.allocation_bytes:
            raise ValueError(f"IPC buffer [{record.offset}, +{nbytes}) exceeds its allocation of "
                             f"{record.allocation_bytes} bytes")
        peer = self._peers.setdefault(kv_url.split("/v1/kv/")[0], len(self._peers))
        src = transport.open(peer, record)
        try:
            dst = torch.empty(nbytes, dtype=torch.uint8, device=transport.device)
            rt, _ = cuda_bindings()
            with torch.cuda.device(transport.device):
                stream = torch.cuda.current_stream()
                check(rt.cudaMemcpyAsync(dst.data_ptr(), src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDefault,
                                         stream.cuda_stream), f"cudaMemcpyAsync of {nbytes} KV bytes")
                stream.synchronize()
        finally:
            transport.release(peer, record)
        return dst

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._transport is not None:
            self._transport.close()


class _Fallback(Exception):
    """The fast path is not available for this pull; HTTP is."""


def _read_shm(path: str, nbytes: int) -> torch.Tensor:
    if not os.path.basename(path).startswith(SHM_PREFIX) or os.path.dirname(path) != SHM_DIR:
        raise ValueError(f"refusing to read {path!r}: not a shared KV file")
    flat = torch.empty(nbytes, dtype=torch.uint8)
    with open(path, "rb") as f:
        got = f.readinto(memoryview(flat.numpy()))
    if got != nbytes:
        raise ValueError(f"{path} holds {got} bytes, expected {nbytes}")
    return flat
