"""The context server's KV export pool: ONE shareable allocation that hand-overs live in.

Mapping a fresh allocation per hand-over (a CUDA IPC handle of a new buffer, or a new file in
/dev/shm) costs far more than copying it: on one H200 a 2.3 GB hand-over spent 81 ms end to
end against ~1 ms for the copy. So a context server exports every sequence's KV into a block
of one pool, created once, and a generation server maps the pool once per context server
(``kv_puller``) and afterwards only copies ``(offset, nbytes)`` per hand-over.

* ``BlockAllocator``: pure offset arithmetic over ``[0, capacity)``: first fit, a free list
  sorted by offset and coalesced on free, ``ALIGN``-byte blocks; thread-safe (the engine thread
  allocates exports, the event loop frees them).
* ``PoolBlock``: one entry's bytes (``tensor``, uint8 ``[nbytes]``). ``release()`` frees it; a
  block nobody released (an export the engine dropped, an error path) is freed when it is
  garbage collected, so a pool cannot leak through a forgotten entry.
* ``KvExportPool``: the memory. On a GPU one device allocation shared through CUDA IPC (kind
  ``cuda_ipc``); on the CPU, or when the GPU's memory cannot be shared (no ``cuda.bindings``,
  ``expandable_segments``), one POSIX shm file ``/dev/shm/trtllm_dwdp_kv_<pid>_pool_*`` (kind
  ``shm``). ``describe(block)`` is what a share request answers: the pool's identity (``id``:
  its kind and device; ``incarnation``: new for every pool a process creates, so a generation
  server sees a restarted context server and maps its new pool), its handle or file, and the
  block's offset.

Sizing (``kv_transfer_pool_bytes``): absent, a quarter of the KV cache, at least one sequence of
``max_seq_len`` tokens, at most the cache, created at the first context-only request (so
generation and aggregated servers hold none); a number, that size created at start-up (an error
if one ``max_seq_len`` sequence cannot fit); 0, no pool (hand-overs go over HTTP). An export that
does not fit when prefill ends stays in memory of its own; its share request moves it into the
pool, waiting up to ``wait_s`` for room, else it goes over HTTP (logged).
"""
from __future__ import annotations

import base64
import bisect
import collections
import contextlib
import logging
import os
import secrets
import threading
import time
import weakref
from typing import Any

import torch

logger = logging.getLogger(__name__)

ALIGN = 256  # block offsets and sizes: enough for any dtype and for CUDA copies
SHM_DIR = "/dev/shm"
SHM_PREFIX = "trtllm_dwdp_kv_"
# Kept free in /dev/shm beyond a shm pool, so a full tmpfs fails our check, not a later write.
SHM_HEADROOM_BYTES = 64 << 20


def align_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


class BlockAllocator:
    """Sub-allocates ``[0, capacity)`` in ``align``-byte blocks (first fit, coalescing frees).

    ``free_later`` is for finalizers: it only queues the offset (no lock, so it is safe whatever
    thread the garbage collector runs it on); every other call applies the queued frees first.
    """

    def __init__(self, capacity: int, align: int = ALIGN) -> None:
        if capacity < align or capacity % align:
            raise ValueError(f"pool capacity {capacity} must be a positive multiple of {align} bytes")
        self.capacity = capacity
        self.align = align
        self._free_offsets = [0]          # sorted; parallel to _free_sizes
        self._free_sizes = [capacity]
        self._used: dict[int, int] = {}   # offset -> size
        self._pending: collections.deque[int] = collections.deque()
        self._lock = threading.Lock()

    def allocate(self, nbytes: int) -> int | None:
        """The offset of a new block of ``nbytes`` (rounded up to ``align``), or None when no
        free range is large enough now."""
        if nbytes < 0:
            raise ValueError(f"cannot allocate {nbytes} bytes")
        size = align_up(max(nbytes, 1), self.align)
        with self._lock:
            self._drain()
            for i, free in enumerate(self._free_sizes):
                if free >= size:
                    offset = self._free_offsets[i]
                    if free == size:
                        del self._free_offsets[i], self._free_sizes[i]
                    else:
                        self._free_offsets[i] += size
                        self._free_sizes[i] -= size
                    self._used[offset] = size
                    return offset
        return None

    def free(self, offset: int) -> None:
        with self._lock:
            self._drain()
            self._free(offset)

    def free_later(self, offset: int) -> None:
        self._pending.append(offset)

    def _drain(self) -> None:
        while self._pending:
            self._free(self._pending.popleft())

    def _free(self, offset: int) -> None:
        size = self._used.pop(offset, None)
        if size is None:
            raise KeyError(f"pool offset {offset} is not an allocated block (freed twice?)")
        i = bisect.bisect_left(self._free_offsets, offset)
        # Merge with the free range after it, then with the one before it.
        if i < len(self._free_offsets) and self._free_offsets[i] == offset + size:
            size += self._free_sizes[i]
            del self._free_offsets[i], self._free_sizes[i]
        if i > 0 and self._free_offsets[i - 1] + self._free_sizes[i - 1] == offset:
            self._free_sizes[i - 1] += size
        else:
            self._free_offsets.insert(i, offset)
            self._free_sizes.insert(i, size)

    def stats(self) -> dict[str, int]:
        with self._lock:
            self._drain()
            used = sum(self._used.values())
            return {"capacity": self.capacity, "used": used, "entries": len(self._used),
                    "largest_free": max(self._free_sizes, default=0), "free_ranges": len(self._free_sizes)}


class PoolBlock:
    """One hand-over's bytes in a pool: ``tensor`` (uint8 ``[nbytes]``) at ``offset``."""

    def __init__(self, pool: "KvExportPool", offset: int, nbytes: int, tensor: torch.Tensor) -> None:
        self.pool = pool
        self.offset = offset
        self.nbytes = nbytes
        self.tensor = tensor
        self._finalizer = weakref.finalize(self, pool.allocator.free_later, offset)

    def release(self) -> None:
        """Give the block back (idempotent; also done when the block is garbage collected)."""
        self._finalizer()

    @property
    def released(self) -> bool:
        return not self._finalizer.alive


class PoolUnavailable(RuntimeError):
    """The pool's memory could not be created (the message says why and what to change)."""


def pool_bytes_for(requested: int | None, budget: Any) -> int:
    """The pool size for ``kv_transfer_pool_bytes=requested`` and the engine's ``KvBudget``
    (``bytes_per_token``, ``max_seq_len``, ``nbytes``); ValueError if ``requested`` cannot hold
    one sequence of ``max_seq_len`` tokens."""
    one = align_up(budget.bytes_per_token * budget.max_seq_len)
    if requested is None:
        return align_up(min(max(budget.nbytes // 4, one), max(budget.nbytes, one)))
    if requested < one:
        raise ValueError(
            f"kv_transfer_pool_bytes={requested} cannot hold the KV of one sequence of "
            f"max_seq_len={budget.max_seq_len} tokens ({one} bytes at {budget.bytes_per_token} "
            f"bytes/token): raise it to at least {one}, or set 0 to hand every KV over HTTP")
    return align_up(requested)


class KvExportPool:
    """The export pool of one context server (see the module docstring).

    ``device`` is the engine's; ``nbytes`` the size, or None to size it from the KV budget
    given to ``plan``. ``open()`` creates the memory (raises ``PoolUnavailable``); ``ensure()``
    does so once and, on failure, logs a warning and leaves the server without a pool.
    """

    def __init__(self, device: torch.device | str, nbytes: int | None = None, *, wait_s: float = 1.0) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.requested = nbytes
        self.capacity = align_up(nbytes) if nbytes is not None else None
        self.wait_s = wait_s
        self.allocator: BlockAllocator | None = None
        self.kind: str | None = None
        self.incarnation = f"{os.getpid()}-{secrets.token_hex(6)}"
        self.error: str | None = None
        self.counts = {"exports": 0, "exports_elsewhere": 0, "adopted": 0, "full": 0, "too_large": 0}
        self._tensor: torch.Tensor | None = None
        self._handle: dict[str, Any] = {}  # the pool's part of every share answer
        self._path: str | None = None
        self._mmap = None
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._tried = False
        self._closed = False

    # ---- creation --------------------------------------------------------------------------
    def plan(self, budget: Any) -> int:
        """Fix the size from the engine's KV budget (see ``pool_bytes_for``)."""
        self.capacity = pool_bytes_for(self.requested, budget)
        return self.capacity

    @property
    def explicit(self) -> bool:
        """Sized by ``kv_transfer_pool_bytes`` (made at start-up), not from the KV budget."""
        return self.requested is not None

    @property
    def ready(self) -> bool:
        return self.allocator is not None and not self._closed

    def ensure(self) -> bool:
        """Create the memory unless done or tried before; False (reason in ``error``) if none."""
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    self._open_locked()
                except PoolUnavailable as exc:
                    self.error = str(exc)
                    logger.warning("no KV export pool: %s; hand-overs from this server go over HTTP", exc)
        return self.ready

    def open(self) -> None:
        """Create the memory now (start-up with an explicit size); raises ``PoolUnavailable``."""
        with self._lock:
            self._tried = True
            if not self.ready:
                self._open_locked()

    def _open_locked(self) -> None:
        if self._closed:
            raise PoolUnavailable("the pool is closed")
        if self.capacity is None:
            raise PoolUnavailable("the pool has no size: give kv_transfer_pool_bytes or plan() it "
                                  "from the engine's KV budget")
        start = time.perf_counter()
        if self.device.type == "cuda":
            try:
                self._open_cuda()
            except _NotShareable as exc:
                logger.warning("KV export pool on %s cannot be shared over CUDA IPC (%s); using a "
                               "host pool in %s instead", self.device, exc, SHM_DIR)
                self._open_shm()
        else:
            self._open_shm()
        self.allocator = BlockAllocator(self.capacity)
        self._handle = {"id": f"{self.kind}:{self._tensor.device}", "incarnation": self.incarnation,
                        "bytes": self.capacity, **self._handle}
        logger.info("KV export pool: %.3f GiB, %s on %s, made in %.1f ms", self.capacity / 2**30, self.kind,
                    self._tensor.device, (time.perf_counter() - start) * 1e3)

    def _open_cuda(self) -> None:
        try:
            from tensorrt_llm_dwdp.transport.cuda_ipc import CudaIpcTransport, check, cuda_bindings

            rt, _ = cuda_bindings()
        except ImportError as exc:
            raise _NotShareable(str(exc)) from exc
        try:
            tensor = torch.empty(self.capacity, dtype=torch.uint8, device=self.device)
        except torch.OutOfMemoryError as exc:
            raise PoolUnavailable(
                f"a KV export pool of {self.capacity} bytes does not fit on {self.device} "
                f"(kv_transfer_pool_bytes{'' if self.explicit else ' not set: sized from the KV cache'}); "
                f"lower kv_transfer_pool_bytes, or set 0 to hand KV over HTTP") from exc
        try:
            with torch.cuda.device(self.device):
                # A thread may have no current CUDA context yet; the driver call needs one.
                check(rt.cudaFree(0), "cudaFree(0)")
            transport = CudaIpcTransport(self.device)
            record = transport.export(tensor)
            transport.close()
        except Exception as exc:  # memory not IPC-capable (expandable_segments, async pools)
            raise _NotShareable(str(exc)) from exc
        self._tensor = tensor
        self.kind = "cuda_ipc"
        self._handle = {"ipc": {"allocation": record.allocation, "handle": base64.b64encode(record.handle).decode(),
                                "allocation_bytes": record.allocation_bytes, "offset": record.offset,
                                "device": record.device}}

    def _open_shm(self) -> None:
        from tensorrt_llm_dwdp.dwdp.control import create_mapped

        st = os.statvfs(SHM_DIR)
        if st.f_bavail * st.f_frsize < self.capacity + SHM_HEADROOM_BYTES:
            raise PoolUnavailable(
                f"{SHM_DIR} has {st.f_bavail * st.f_frsize} bytes free, a KV export pool of "
                f"{self.capacity} needs them plus {SHM_HEADROOM_BYTES} headroom; lower "
                f"kv_transfer_pool_bytes or enlarge {SHM_DIR}")
        path = os.path.join(SHM_DIR, f"{SHM_PREFIX}{os.getpid()}_pool_{secrets.token_hex(6)}")
        try:
            self._mmap = create_mapped(path, self.capacity)
        except OSError as exc:
            raise PoolUnavailable(f"cannot create {path}: {exc}") from exc
        self._path = path
        self._unlink_at_exit = weakref.finalize(self, _unlink, path)  # a pool never closed
        self._tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self.kind = "shm"
        self._handle = {"path": path}

    def _count(self, what: str) -> None:
        with self._count_lock:
            self.counts[what] += 1

    # ---- blocks ------------------------------------------------------------------------------
    def try_allocate(self, nbytes: int) -> PoolBlock | None:
        """A block of ``nbytes`` now, or None (no pool yet, closed, or no room)."""
        allocator, tensor = self.allocator, self._tensor  # close() may run on another thread
        if allocator is None or tensor is None:
            return None
        offset = allocator.allocate(nbytes)
        if offset is None:
            return None
        return PoolBlock(self, offset, nbytes, tensor[offset:offset + nbytes])

    def export_alloc(self, nbytes: int) -> PoolBlock | None:
        """The engine's hook for a finished prefill's export: a block when the pool lives on the
        engine's device and has room now (never waits; the share request moves the rest)."""
        if self._tensor is None or self._tensor.device != self.device:
            return None
        block = self.try_allocate(nbytes)
        self._count("exports" if block is not None else "exports_elsewhere")
        return block

    def allocate(self, nbytes: int, wait_s: float | None = None) -> PoolBlock | None:
        """A block of ``nbytes``, waiting up to ``wait_s`` (default: the pool's) for hand-overs
        to be released; None if there is still no room (or the entry can never fit)."""
        if self.capacity is not None and align_up(max(nbytes, 1)) > self.capacity:
            self._count("too_large")
            return None
        deadline = time.monotonic() + (self.wait_s if wait_s is None else wait_s)
        while True:
            block = self.try_allocate(nbytes)
            if block is not None or self._closed or time.monotonic() >= deadline:
                if block is None:
                    self._count("full")
                return block
            time.sleep(0.002)

    def adopt(self, handoff: Any) -> Any:
        """``handoff`` (a ``KvHandoff`` in memory of its own) copied into a block of this pool
        (waiting for room as ``allocate``), or None without room; the original is left as is."""
        block = self.allocate(handoff.nbytes)
        if block is None:
            return None
        with torch.cuda.device(block.tensor.device) if block.tensor.is_cuda else contextlib.nullcontext():
            moved = handoff.pack(copy=True, alloc=lambda nbytes: block)
        self._count("adopted")
        return moved

    def holds(self, block: PoolBlock | None) -> bool:
        return block is not None and block.pool is self and not block.released

    def describe(self, block: PoolBlock) -> dict[str, Any]:
        """Where ``block`` is, for a process on this node: ``{"id", "incarnation", "bytes",
        "offset"}`` plus the pool's CUDA IPC handle (``ipc``) or shm file (``path``)."""
        return {**self._handle, "offset": block.offset}

    def stats(self) -> dict[str, float]:
        """Gauges for /metrics (all zero while no pool exists)."""
        s = self.allocator.stats() if self.allocator is not None else {}
        return {"kv_pool_bytes": float(s.get("capacity", 0)), "kv_pool_used_bytes": float(s.get("used", 0)),
                "kv_pool_entries": float(s.get("entries", 0)),
                "kv_pool_largest_free_bytes": float(s.get("largest_free", 0)),
                **{f"kv_pool_{k}": float(v) for k, v in self.counts.items()}}

    # ---- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Unlink the shm file and drop the memory (blocks still referenced keep their bytes
        alive until they go; their release is then a no-op). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._path is not None:
                self._unlink_at_exit()
            # Never close the mmap here: tensors over it hold it, it unmaps with the last one.
            self._tensor = self._mmap = None


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


class _NotShareable(Exception):
    """GPU memory for the pool cannot be shared over CUDA IPC (a host pool is used instead)."""
