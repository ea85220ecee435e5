"""POSIX shared-memory transport for CPU ranks.

``allocate`` creates one segment under /dev/shm per call and returns a torch tensor over its
mapping, so expert weights live in memory the peers map read-only by name. Owners unlink their
names once every peer has mapped them (``after_exchange``) and again on ``close`` (a crash before
the exchange is covered by a finalizer), so nothing stays in /dev/shm; the memory itself lives
until the last mapping (a tensor of the owner, a peer's map) goes away. With host tiers the names
stay until ``close`` (a restarted peer maps them later), and the survivors of a killed owner
remove its names (``forget``).
"""
from __future__ import annotations

import logging
import mmap
import os
import secrets
import weakref
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from tensorrt_llm_dwdp.dwdp.errors import DwdpRegistrationError
from tensorrt_llm_dwdp.transport.base import HandleRecord, Transport

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
NAME_PREFIX = "trtllm_dwdp_"


@dataclass
class _Segment:
    name: str
    mm: mmap.mmap
    base: int
    size: int


def _address(mm: mmap.mmap) -> tuple[int, np.ndarray]:
    array = np.frombuffer(mm, dtype=np.uint8)
    return int(array.ctypes.data), array


def _unlink_all(names: list[str]) -> None:
    for name in names:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass
    names.clear()


class ShmTransport(Transport):
    """Shared memory between CPU processes of one host."""

    kind = "shm"

    def __init__(self) -> None:
        super().__init__()
        if not os.path.isdir(SHM_DIR):
            raise RuntimeError(f"the shm transport needs POSIX shared memory at {SHM_DIR} (Linux)")
        self._own: list[_Segment] = []
        self._linked: list[str] = []  # own names still present in /dev/shm
        self._peer_maps: dict[int, tuple[mmap.mmap, np.ndarray]] = {}
        self._finalizer = weakref.finalize(self, _unlink_all, self._linked)
        self._closed = False

    # ------------------------------------------------------------------ own memory
    def allocate(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        if self._closed:
            raise RuntimeError("ShmTransport.allocate after close")
        shape = tuple(int(d) for d in shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = itemsize * int(np.prod(shape, dtype=np.int64))
        size = max(mmap.PAGESIZE, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
        name = f"{NAME_PREFIX}{os.getpid()}_{len(self._own)}_{secrets.token_hex(4)}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._linked.append(name)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except OSError:
            os.close(fd)
            _unlink_all([name])
            self._linked.remove(name)
            raise
        os.close(fd)
        base, _ = _address(mm)
        self._own.append(_Segment(name, mm, base, size))
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes)
        return flat.view(dtype).view(shape)

    def export(self, tensor: torch.Tensor) -> HandleRecord:
        if tensor.device.type != "cpu":
            raise DwdpRegistrationError(
                f"the shm transport shares CPU tensors, got one on {tensor.device}"
            )
        ptr, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        for seg in self._own:
            if seg.base <= ptr and ptr + nbytes <= seg.base + seg.size:
                return HandleRecord(self.kind, seg.name, seg.name.encode(), seg.size,
                                    ptr - seg.base, nbytes)
        raise DwdpRegistrationError(
            f"tensor at 0x{ptr:x} ({nbytes} bytes) is not in shared memory: allocate expert "
            f"weights with DwdpManager.allocate(shape, dtype) so peers can map them"
        )

    # ------------------------------------------------------------------ peers
    def _map(self, record: HandleRecord) -> int:
        name = record.handle.decode()
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"shared-memory segment {path} is gone (its owner exited or closed)"
            ) from None
        try:
            size = os.fstat(fd).st_size
            if size != record.allocation_bytes:
                raise ValueError(
                    f"shared-memory segment {path} has {size} bytes, expected "
                    f"{record.allocation_bytes}"
                )
            mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        base, array = _address(mm)
        self._peer_maps[base] = (mm, array)
        return base

    def _unmap(self, base: int, record: HandleRecord) -> None:
        mm, array = self._peer_maps.pop(base)
        del array
        mm.close()

    def forget(self, record: HandleRecord) -> None:
        _unlink_all([record.handle.decode()])

    # ------------------------------------------------------------------ lifetime
    def after_exchange(self) -> None:
        _unlink_all(self._linked)

    @property
    def own_names(self) -> list[str]:
        """Names of this rank's segments (whether or not still linked in /dev/shm)."""
        return [seg.name for seg in self._own]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.close_peers()
        finally:
            _unlink_all(self._linked)
            # Never munmap our own segments here: torch tensors over them do not pin the
            # mapping, they hold a reference to the mmap object. Dropping ours leaves the
            # mapping to be released with the last tensor that views it.
            self._own.clear()
            self._finalizer.detach()
