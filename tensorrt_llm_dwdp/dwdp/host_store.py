"""HostStore: one copy of a DWDP group's routed experts in host memory, per node (POSIX shm).

Layout (``StoreLayout``, pure): for each registered layer in registration order and each of its
tensors in registration order, one region holding all E experts (expert e at byte
``e * expert_bytes``), each region starting on a page boundary. So a peer's expert range is
one contiguous byte range here exactly as in the peer's own tensor, and a copy plan switches
tiers by switching its source address.

Filled once at the handle exchange from what the ranks loaded (no second checkpoint read):
rank r writes ``tiers.writer_range(r)`` of every layer, then records the checksum (CRC32 of
chunk CRC32s) of each (layer, writer part) in the group's control block; ``verify`` re-reads the parts a rank is
about to depend on (failover, rejoin, offload) and fails loudly on a mismatch. On GPU ranks each
process registers its mapping with ``cudaHostRegister`` so copies from it are DMA (H2D at PCIe
speed, asynchronous on the copy stream).
"""
from __future__ import annotations

import concurrent.futures
import logging
import mmap
import os
import zlib
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from tensorrt_llm_dwdp.dwdp.config import DwdpConfigError
from tensorrt_llm_dwdp.dwdp.control import SHM_DIR, create_mapped, group_path, open_mapped
from tensorrt_llm_dwdp.dwdp.errors import DwdpError

logger = logging.getLogger(__name__)

PAGE = 4096
_CRC_CHUNK = 64 << 20
_CRC_THREADS = min(8, os.cpu_count() or 1)


class DwdpBackupError(DwdpError):
    """The host store is missing, incomplete or corrupt (a checksum does not match)."""


def _align(n: int) -> int:
    return -(-n // PAGE) * PAGE


@dataclass(frozen=True)
class StoreLayout:
    """Where each (layer position, tensor name) region of the store lies.

    ``layers``: per registered layer, ``{name: bytes of one expert}`` in registration order.
    """

    num_experts: int
    layers: tuple[tuple[tuple[str, int], ...], ...]
    offsets: tuple[tuple[int, ...], ...] = field(init=False)
    total_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        offsets, cursor = [], 0
        for names in self.layers:
            row = []
            for _, eb in names:
                row.append(cursor)
                cursor += _align(self.num_experts * eb)
            offsets.append(tuple(row))
        object.__setattr__(self, "offsets", tuple(offsets))
        object.__setattr__(self, "total_bytes", max(cursor, PAGE))

    @classmethod
    def of(cls, num_experts: int, layers: Sequence[Mapping[str, int]]) -> "StoreLayout":
        return cls(num_experts, tuple(tuple(layer.items()) for layer in layers))

    def region(self, pos: int, name: str) -> tuple[int, int]:
        """``(byte offset of expert 0, bytes per expert)`` of tensor ``name`` of layer ``pos``."""
        for i, (n, eb) in enumerate(self.layers[pos]):
            if n == name:
                return self.offsets[pos][i], eb
        raise KeyError(f"layer position {pos} has no tensor {name!r} in the host store "
                       f"(has {[n for n, _ in self.layers[pos]]})")

    def fingerprint(self) -> int:
        """A 31-bit digest of the layout; ranks of one group must agree on it."""
        return zlib.crc32(repr((self.num_experts, self.layers)).encode()) & 0x7FFFFFFF


def store_bytes(num_experts: int, num_layers: int, expert_bytes: Mapping[str, int]) -> int:
    """Bytes of a store of ``num_layers`` layers of ``num_experts`` experts whose tensors take
    ``expert_bytes[name]`` bytes per expert (what ``check-config`` and ``run`` report)."""
    return StoreLayout.of(num_experts, [dict(expert_bytes)] * num_layers).total_bytes


def check_checkpoint_store(model_dir: str, groups: int = 1) -> int:
    """Before a rank loads anything: the host store(s) of ``groups`` DWDP groups of checkpoint
    ``model_dir`` must fit in /dev/shm and RAM (DwdpConfigError naming the numbers otherwise).
    Returns the bytes of one group's store."""
    from tensorrt_llm_dwdp.model.checkpoint import read_config
    from tensorrt_llm_dwdp.moe.specs import expert_specs

    cfg, quant = read_config(model_dir)
    specs = expert_specs(quant, cfg.hidden_size, cfg.moe_intermediate_size)
    one = store_bytes(cfg.num_experts, len(cfg.moe_layer_indices),
                      {n: spec.nbytes() for n, spec in specs.items()})
    check_host_memory(groups * one, f"the host store of {groups} DWDP group(s) of {model_dir}")
    return one


def host_memory(path: str = SHM_DIR) -> dict[str, int]:
    """Bytes free for a new store: ``shm_free`` (the tmpfs behind ``path``) and
    ``mem_available`` (``MemAvailable`` of /proc/meminfo; -1 where unknown)."""
    st = os.statvfs(path)
    available = -1
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return {"shm_free": st.f_bavail * st.f_frsize, "mem_available": available}


def check_host_memory(nbytes: int, what: str, path: str = SHM_DIR) -> None:
    """Raise ``DwdpConfigError`` naming the numbers unless ``nbytes`` fit in /dev/shm and RAM."""
    free = host_memory(path)
    gib = 2 ** 30
    if nbytes > free["shm_free"]:
        raise DwdpConfigError(
            f"{what} needs {nbytes / gib:.2f} GiB of POSIX shared memory but {path} has "
            f"{free['shm_free'] / gib:.2f} GiB free: enlarge it (docker --shm-size, or mount -o "
            f"remount,size=... {path}) or turn host_backup / host_experts_per_worker off")
    if 0 <= free["mem_available"] < nbytes:
        raise DwdpConfigError(
            f"{what} needs {nbytes / gib:.2f} GiB of host memory but only "
            f"{free['mem_available'] / gib:.2f} GiB are available (MemAvailable): use fewer "
            f"layers or experts per node, or turn host_backup / host_experts_per_worker off")


class HostStore:
    """The mapped store of one group on this node (``create`` by one rank, ``open`` by the
    others); ``register_cuda`` pins this process's mapping; ``close`` unmaps it."""

    def __init__(self, key: str, layout: StoreLayout, mm: mmap.mmap) -> None:
        self.key = key
        self.layout = layout
        self.path = group_path(key, "store")
        self._mm = mm
        self._array = np.frombuffer(mm, dtype=np.uint8)
        self.base = int(self._array.ctypes.data)
        self._registered: object = None  # cuda.bindings runtime module once registered

    @classmethod
    def create(cls, key: str, layout: StoreLayout) -> "HostStore":
        check_host_memory(layout.total_bytes, f"the DWDP host store of group {key}")
        return cls(key, layout, create_mapped(group_path(key, "store"), layout.total_bytes))

    @classmethod
    def open(cls, key: str, layout: StoreLayout) -> "HostStore":
        path = group_path(key, "store")
        mm = open_mapped(path, f"the host store {path} is gone (its group closed or was cleaned "
                               f"up)", layout.total_bytes, DwdpBackupError)
        return cls(key, layout, mm)

    # ------------------------------------------------------------------ addresses and views
    def address(self, pos: int, name: str, expert: int = 0) -> int:
        """Address, in this process, of global expert ``expert`` of tensor ``name``."""
        offset, eb = self.layout.region(pos, name)
        return self.base + offset + expert * eb

    def experts(self, pos: int, name: str, first: int, count: int) -> torch.Tensor:
        """A uint8 CPU tensor ``[count, expert_bytes]`` viewing experts ``[first, first+count)``."""
        offset, eb = self.layout.region(pos, name)
        start = offset + first * eb
        flat = torch.from_numpy(self._array[start:start + count * eb])
        return flat.view(count, eb) if eb else flat.view(count, 0)

    def write(self, pos: int, first: int, tensors: Mapping[str, torch.Tensor],
              skip: int = 0) -> None:
        """Copy experts ``[skip, n)`` of each tensor into global experts ``[first, ...)``."""
        for name, t in tensors.items():
            n = t.shape[0] - skip
            if n <= 0:
                continue
            raw = t[skip:].contiguous().view(torch.uint8).reshape(n, -1)
            self.experts(pos, name, first, n).copy_(raw)

    # ------------------------------------------------------------------ checksums
    def crc(self, pos: int, first: int, stop: int) -> int:
        """Checksum of experts ``[first, stop)`` of every tensor of layer ``pos``: the CRC32 of
        the CRC32s of its 64 MiB chunks (tensors in order), the chunks summed in parallel
        threads (zlib releases the GIL), so checking a whole store runs at several GB/s."""
        chunks = []
        for name, eb in self.layout.layers[pos]:
            offset, _ = self.layout.region(pos, name)
            lo, hi = offset + first * eb, offset + stop * eb
            chunks += [(start, min(hi, start + _CRC_CHUNK)) for start in range(lo, hi, _CRC_CHUNK)]
        if len(chunks) <= 1:
            sums = [zlib.crc32(self._array[a:b]) for a, b in chunks]
        else:
            with concurrent.futures.ThreadPoolExecutor(min(_CRC_THREADS, len(chunks))) as pool:
                sums = list(pool.map(lambda c: zlib.crc32(self._array[c[0]:c[1]]), chunks))
        return zlib.crc32(np.asarray(sums, dtype=np.uint32).tobytes())

    def verify(self, parts: Sequence[tuple[int, int, int, int | None]], what: str) -> None:
        """Check ``(pos, first, stop, expected crc)`` parts; raise DwdpBackupError naming every
        bad or unwritten part."""
        bad = []
        for pos, first, stop, want in parts:
            if want is None:
                bad.append(f"layer position {pos} experts [{first}, {stop}) was never written")
                continue
            value = self.crc(pos, first, stop)
            if value != want:
                bad.append(f"layer position {pos} experts [{first}, {stop}): CRC32 {value:#010x}, "
                           f"recorded {want:#010x}")
        if bad:
            raise DwdpBackupError(f"{what}: the host store {self.path} is corrupt or incomplete: "
                                  + "; ".join(bad))

    # ------------------------------------------------------------------ DMA
    def register_cuda(self) -> None:
        """Page-lock and map this process's mapping for DMA by every GPU (cudaHostRegister)."""
        if self._registered is not None:
            return
        from tensorrt_llm_dwdp.transport.cuda_ipc import check, cuda_bindings

        rt, _ = cuda_bindings()
        check(rt.cudaHostRegister(self.base, self.layout.total_bytes,
                                  rt.cudaHostRegisterPortable),
              f"cudaHostRegister of the host store ({self.layout.total_bytes} bytes)")
        self._registered = rt

    def close(self) -> None:
        """Unregister and unmap (the file stays until ``unlink_group``)."""
        rt, self._registered = self._registered, None
        if rt is not None:
            err = rt.cudaHostUnregister(self.base)
            err = err[0] if isinstance(err, tuple) else err
            if int(err) != 0:
                logger.warning("cudaHostUnregister of the host store failed: %r", err)
        array, self._array = self._array, None
        if array is None:
            return
        del array
        try:
            self._mm.close()
        except BufferError:  # a tensor viewing the store is still alive: the GC unmaps it
            logger.debug("host store %s left mapped (views alive)", self.path)
