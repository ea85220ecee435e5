"""Memory the composite views can map twice: virtual-memory allocations shared by handle.

Used with ``expert_view: composite``. Each ``allocate_at`` is one physical allocation of whole
pages (``cuMemCreate`` on GPUs, a memfd on CPUs) mapped once for its owner; the composite view
maps it a second time, which memory from the caching allocator or /dev/shm names cannot offer.
Peers reach an allocation through a handle:

* ``posix_fd`` (default; one host): the allocation's file descriptor, passed over a unix socket
  with SCM_RIGHTS (``fd_passing``), imported and mapped by the peer. On GPUs this is CUDA's
  ``CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR``; on CPUs the memfd itself.
* ``fabric`` (GPUs across nodes over multi-node NVLink): the 64-byte ``CUmemFabricHandle`` in the
  handle record itself. Written against the driver API; not run on the machines this project is
  tested on.

The descriptor server lives from the first ``export`` until ``after_exchange`` (every peer has
mapped), so no descriptor outlives the exchange.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from tensorrt_llm_dwdp.dwdp.errors import DwdpRegistrationError
from tensorrt_llm_dwdp.dwdp.vmm import CpuVmm, GpuVmm, Memory, VmmError
from tensorrt_llm_dwdp.transport.base import HandleRecord, Transport
from tensorrt_llm_dwdp.transport.fd_passing import FdServer, receive_fds

logger = logging.getLogger(__name__)

HANDLE_TYPES = ("posix_fd", "fabric")
EDGE_POISON = 0xA5  # bytes of an allocation outside its tensor until the owner fills them


@dataclass
class _Allocation:
    key: str
    mem: Memory
    base: int
    resident: torch.Tensor | None  # the owner's mapping (dropped at close; tensors keep it)


class VmmTransport(Transport):
    """Page-granular allocations of one device, shared with local peers by handle."""

    def __init__(self, vmm: CpuVmm | GpuVmm, handle_type: str = "posix_fd",
                 timeout_s: float = 60.0) -> None:
        super().__init__()
        if handle_type not in HANDLE_TYPES:
            raise ValueError(f"handle type {handle_type!r}; choose one of {HANDLE_TYPES}")
        self.vmm = vmm
        self.handle_type = handle_type
        self.kind = f"{vmm.kind}_vmm_{handle_type}"
        self.device = vmm.device
        self._timeout_s = timeout_s
        self._allocations: list[_Allocation] = []
        self._server: FdServer | None = None
        self._peer_keep: dict[int, Any] = {}
        self._closed = False

    # ------------------------------------------------------------------ own memory
    def allocate(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return self.allocate_at(shape, dtype, 0)

    def allocate_at(self, shape: Sequence[int], dtype: torch.dtype, offset: int,
                    size: int | None = None) -> torch.Tensor:
        """A zeroed tensor starting ``offset`` bytes into a fresh allocation of at least
        ``size`` bytes (whole pages). The allocation's other bytes hold ``EDGE_POISON``."""
        if self._closed:
            raise RuntimeError("VmmTransport.allocate after close")
        shape = tuple(int(d) for d in shape)
        nbytes = torch.empty(shape, dtype=dtype, device="meta").nbytes
        page = self.vmm.granularity
        total = max(size or 0, offset + nbytes, 1)
        total = -(-total // page) * page
        mem = self.vmm.create(total, fabric=self.handle_type == "fabric")
        try:
            resident = self.vmm.resident(mem)
        except BaseException:
            self.vmm.release(mem)
            raise
        base = resident.data_ptr()
        alloc = _Allocation(f"{os.getpid()}.{len(self._allocations)}", mem, base, resident)
        self._allocations.append(alloc)
        resident.fill_(EDGE_POISON)
        view = resident[offset:offset + nbytes]
        view.zero_()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype, device=self.device)
        return view.view(dtype).view(shape)

    def locate(self, tensor: torch.Tensor) -> tuple[Memory, int]:
        """``(allocation, byte offset of the tensor in it)``; DwdpRegistrationError if the
        tensor is not in memory from ``allocate``."""
        ptr, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        for alloc in self._allocations:
            if alloc.base <= ptr and ptr + nbytes <= alloc.base + alloc.mem.size:
                return alloc.mem, ptr - alloc.base
        raise DwdpRegistrationError(
            f"tensor at 0x{ptr:x} ({nbytes} bytes) is not in memory the composite view can map "
            "twice: allocate expert weights with DwdpManager.allocate(shape, dtype)")

    def _allocation(self, tensor: torch.Tensor) -> tuple[_Allocation, int]:
        mem, offset = self.locate(tensor)
        return next(a for a in self._allocations if a.mem is mem), offset

    def export(self, tensor: torch.Tensor) -> HandleRecord:
        if tensor.device != self.device:
            raise DwdpRegistrationError(
                f"tensor is on {tensor.device}, but this DWDP rank shares {self.device}")
        alloc, offset = self._allocation(tensor)
        if self.handle_type == "fabric":
            handle = self.vmm.export_fabric(alloc.mem)
        else:
            if self._server is None:
                self._server = FdServer()
            if alloc.key not in self._server:
                fd = self.vmm.export_fd(alloc.mem)
                try:
                    self._server.add(alloc.key, fd)
                finally:
                    os.close(fd)
            handle = self._server.address.encode()
        index = self.device.index if self.device.type == "cuda" else -1
        return HandleRecord(self.kind, alloc.key, handle, alloc.mem.size, offset,
                            tensor.numel() * tensor.element_size(), index)

    # ------------------------------------------------------------------ peers
    def _map(self, record: HandleRecord) -> int:
        if self.handle_type == "fabric":
            mem = self.vmm.import_fabric(record.handle, record.allocation_bytes)
        else:
            (fd,) = receive_fds(record.handle.decode(), [record.allocation], self._timeout_s)
            try:
                mem = self.vmm.import_fd(fd, record.allocation_bytes)
            except VmmError as exc:
                raise VmmError(f"allocation {record.allocation}: {exc}") from exc
        addr, keep = self.vmm.map_peer(mem)
        self._peer_keep[addr] = keep
        return addr

    def _unmap(self, base: int, record: HandleRecord) -> None:
        self.vmm.unmap_peer(base, record.allocation_bytes, self._peer_keep.pop(base))

    # ------------------------------------------------------------------ lifetime
    def after_exchange(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def close(self) -> None:
        """Unmap peers, stop serving, release the handles of own allocations (their memory
        stays until the last mapping -- a tensor over it, a composite view -- is gone)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.close_peers()
        finally:
            self.after_exchange()
            for alloc in self._allocations:
                alloc.resident = None
                self.vmm.release(alloc.mem)
            self._allocations.clear()
