"""Virtual-memory mapping for composite views: physical memory, reserved ranges, raw tensors.

One interface, two implementations, so the CPU tests run the same composite code as GPUs:

===================  ===========================================  ===================================
operation            ``GpuVmm`` (CUDA VMM, ``cuda.bindings``)     ``CpuVmm`` (Linux, shmem pages)
===================  ===========================================  ===================================
``create``           ``cuMemCreate`` (POSIX-fd shareable or not)  ``memfd_create`` + ``ftruncate``
``reserve``          ``cuMemAddressReserve``                      ``mmap(PROT_NONE)``
``map``              ``cuMemMap`` (whole allocations)             ``mmap(MAP_FIXED | MAP_SHARED)``
``set_access``       ``cuMemSetAccess`` (once per range)          nothing (mapped read-write)
``unmap``/``free``   ``cuMemUnmap`` / ``cuMemAddressFree``        ``mmap(PROT_NONE)`` / ``munmap``
``export_fd``        ``cuMemExportToShareableHandle``             the memfd itself
``import_fd``        ``cuMemImportFromShareableHandle``           the received fd
===================  ===========================================  ===================================

``resident(mem)`` maps an allocation for its owner and returns a uint8 tensor whose lifetime
keeps that mapping alive; ``tensor(addr, nbytes)`` wraps a range the caller keeps mapped.
Every driver call is checked; failures raise ``VmmError`` naming the call and its arguments.
Fabric handles (multi-node NVLink, ``export_fabric``/``import_fabric``) follow the driver API
and are not run on the machines this project is tested on (single-node H200).
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

FABRIC_HANDLE_BYTES = 64  # sizeof(CUmemFabricHandle)
MEMFD_NAME = "trtllm_dwdp"  # CPU memory shows as /memfd:trtllm_dwdp in /proc/<pid>/maps


class VmmError(RuntimeError):
    """A mapping call failed; the message names the call, its arguments and the result."""


@dataclass
class Memory:
    """Physical memory that can be mapped: an fd (CPU) or a CUDA allocation handle (GPU)."""

    handle: int
    size: int
    shareable: bool = True


class PhysicalLedger:
    """Bytes of device memory this process created with ``cuMemCreate`` and still holds, per
    device: the caching allocator does not see them, so a measurement of what a rank holds
    (``model/memory.py``) adds them. The driver frees an allocation once its handle is released
    *and* its last mapping is unmapped (``VmmTransport.close`` releases handles whose memory the
    weights and composite views still map), so an allocation counts until both have happened.
    Imported (peer) handles and their mappings are not ours and are not counted."""

    def __init__(self) -> None:
        self._handles: dict[int, list[int]] = {}  # live handle -> [device index, bytes]
        self._mappings: dict[int, list[int]] = {}  # mapped address -> its allocation's entry

    def created(self, handle: int, device: int, nbytes: int) -> None:
        self._handles[handle] = [device, nbytes]

    def mapped(self, addr: int, handle: int) -> None:
        entry = self._handles.get(handle)
        if entry is not None:
            self._mappings[addr] = entry

    def unmapped(self, addr: int) -> None:
        self._mappings.pop(addr, None)

    def released(self, handle: int) -> None:
        self._handles.pop(handle, None)

    def bytes_on(self, device: int) -> int:
        held = {id(e): e for e in [*self._handles.values(), *self._mappings.values()]}
        return sum(n for d, n in held.values() if d == device)


PHYSICAL = PhysicalLedger()


def physical_bytes(device: torch.device | str) -> int:
    """Device memory this process holds through CUDA VMM on ``device`` (0 on the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    return PHYSICAL.bytes_on(device.index if device.index is not None else torch.cuda.current_device())


def vmm_for(device: torch.device | str) -> "CpuVmm | GpuVmm":
    device = torch.device(device)
    if device.type == "cpu":
        return CpuVmm()
    if device.type == "cuda":
        return GpuVmm(device)
    raise ValueError(f"composite views need a cpu or cuda device, got {device}")


# ---------------------------------------------------------------------------------- CPU
_PROT_NONE, _PROT_RW, _PROT_R = 0, mmap.PROT_READ | mmap.PROT_WRITE, mmap.PROT_READ
_MAP_FIXED, _MAP_NORESERVE = 0x10, 0x4000  # Linux (x86-64 and aarch64 alike)
_NO_CPU_FABRIC = ("fabric handles are a CUDA multi-node NVLink feature; CPU ranks pass memory "
                  "as file descriptors (handle type posix_fd)")


def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


class CpuVmm:
    """Shared-memory pages (memfd) mapped into reserved ranges of this process."""

    kind = "cpu"

    def __init__(self) -> None:
        if not hasattr(os, "memfd_create"):
            raise VmmError("composite views on CPU need Linux memfd_create (os.memfd_create)")
        self._libc = _libc()
        self.device = torch.device("cpu")
        self.minimum_granularity = mmap.PAGESIZE
        self.granularity = mmap.PAGESIZE

    def _mmap(self, addr: int, size: int, prot: int, flags: int, fd: int, offset: int,
              what: str) -> int:
        res = self._libc.mmap(addr or None, size, prot, flags, fd, offset)
        if res is None or res == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            raise VmmError(f"{what}: mmap(0x{addr:x}, {size}, fd={fd}, offset={offset}) failed: "
                           f"{os.strerror(err)}")
        if addr and res != addr:
            raise VmmError(f"{what}: mmap placed {size} bytes at 0x{res:x}, not 0x{addr:x}")
        return int(res)

    def create(self, size: int, shareable: bool = True, fabric: bool = False) -> Memory:
        if fabric:
            raise VmmError(_NO_CPU_FABRIC)
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            raise
        return Memory(fd, size, shareable)

    def release(self, mem: Memory) -> None:
        os.close(mem.handle)

    def export_fd(self, mem: Memory) -> int:
        """An fd the caller may pass on (the caller closes it)."""
        return os.dup(mem.handle)

    def import_fd(self, fd: int, size: int) -> Memory:
        """Take ownership of a received fd; its size must be ``size``."""
        actual = os.fstat(fd).st_size
        if actual != size:
            os.close(fd)
            raise VmmError(f"received memory of {actual} bytes, the exporter announced {size}")
        return Memory(fd, size)

    def export_fabric(self, mem: Memory) -> bytes:
        raise VmmError(_NO_CPU_FABRIC)

    def import_fabric(self, data: bytes, size: int) -> Memory:
        raise VmmError(_NO_CPU_FABRIC)

    def reserve(self, size: int) -> int:
        return self._mmap(0, size, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS |
                          _MAP_NORESERVE, -1, 0, "reserve")

    def map(self, addr: int, mem: Memory, offset: int, size: int, writable: bool = True) -> None:
        self._mmap(addr, size, _PROT_RW if writable else _PROT_R, mmap.MAP_SHARED | _MAP_FIXED,
                   mem.handle, offset, "map")

    def set_access(self, addr: int, size: int, writable: bool = True) -> None:
        return None

    def unmap(self, addr: int, size: int) -> None:
        """Drop the pages, keep the address range reserved (for ``free``)."""
        self._mmap(addr, size, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED |
                   _MAP_NORESERVE, -1, 0, "unmap")

    def free(self, addr: int, size: int) -> None:
        if self._libc.munmap(addr, size) != 0:
            raise VmmError(f"munmap(0x{addr:x}, {size}) failed: {os.strerror(ctypes.get_errno())}")

    def resident(self, mem: Memory) -> torch.Tensor:
        """The owner's uint8 view of ``mem``; the mapping lives as long as the tensor."""
        mm = mmap.mmap(mem.handle, mem.size)
        return torch.frombuffer(mm, dtype=torch.uint8)

    def map_peer(self, mem: Memory) -> tuple[int, Any]:
        """Map a received memory read-only and close its fd: ``(address, keepalive)``; undo
        with ``unmap_peer``."""
        try:
            mm = mmap.mmap(mem.handle, mem.size, prot=mmap.PROT_READ)
        finally:
            os.close(mem.handle)
        import numpy as np

        array = np.frombuffer(mm, dtype=np.uint8)
        return int(array.ctypes.data), [mm, array]

    def unmap_peer(self, addr: int, size: int, keepalive: Any) -> None:
        mm = keepalive[0]
        keepalive.clear()  # the array's export of the mapping must go before close()
        mm.close()

    def tensor(self, addr: int, nbytes: int) -> torch.Tensor:
        """uint8 tensor over ``nbytes`` at ``addr`` (valid while the caller keeps it mapped)."""
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(addr), dtype=torch.uint8)

    def fill(self, addr: int, nbytes: int, byte: int) -> None:
        ctypes.memset(addr, byte, nbytes)

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        ctypes.memmove(dst, src, nbytes)

    def synchronize(self) -> None:
        return None


# ---------------------------------------------------------------------------------- GPU
def _check(result: Any, what: str) -> Any:
    from tensorrt_llm_dwdp.transport.cuda_ipc import check

    return check(result, what, VmmError)


class _CudaArray:
    """Exposes ``nbytes`` at ``ptr`` through ``__cuda_array_interface__`` so torch can wrap it
    without a copy; ``on_free`` runs when the last tensor over it is gone."""

    def __init__(self, ptr: int, nbytes: int, on_free: Any = None) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "strides": None,
                                         "data": (ptr, False), "version": 2}
        self._on_free = on_free

    def __del__(self) -> None:
        if self._on_free is not None:
            try:
                self._on_free()
            except Exception as exc:  # interpreter shutdown may have torn CUDA down
                logger.debug("releasing a DWDP device mapping failed: %s", exc)


class GpuVmm:
    """CUDA virtual memory management on one device through ``cuda.bindings.driver``."""

    kind = "cuda"

    def __init__(self, device: torch.device | str) -> None:
        from tensorrt_llm_dwdp.transport.cuda_ipc import cuda_bindings

        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._rt, self._drv = cuda_bindings()
        d = self._drv
        with torch.cuda.device(self.device):
            torch.zeros(1, device=self.device)  # the primary context exists and is current
        self._loc = d.CUmemLocation()
        self._loc.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._loc.id = self.device.index
        self._access = d.CUmemAccessDesc()
        self._access.location = self._loc
        self._access.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        prop = self._prop(shareable=True)
        flags = d.CUmemAllocationGranularity_flags
        self.minimum_granularity = int(_check(
            d.cuMemGetAllocationGranularity(prop, flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM),
            "cuMemGetAllocationGranularity(MINIMUM)"))
        self.granularity = int(_check(
            d.cuMemGetAllocationGranularity(prop, flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
            "cuMemGetAllocationGranularity(RECOMMENDED)"))

    def _prop(self, shareable: bool, fabric: bool = False) -> Any:
        d = self._drv
        types = d.CUmemAllocationHandleType
        prop = d.CUmemAllocationProp()
        prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location = self._loc
        if fabric:
            prop.requestedHandleTypes = types.CU_MEM_HANDLE_TYPE_FABRIC
        elif shareable:
            prop.requestedHandleTypes = types.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        else:
            prop.requestedHandleTypes = types.CU_MEM_HANDLE_TYPE_NONE
        return prop

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        with torch.cuda.device(self.device):
            return _check(fn(*args), what)

    def create(self, size: int, shareable: bool = True, fabric: bool = False) -> Memory:
        handle = self._call(f"cuMemCreate({size} bytes on GPU {self.device.index})",
                            self._drv.cuMemCreate, size, self._prop(shareable, fabric), 0)
        PHYSICAL.created(int(handle), self.device.index, size)
        return Memory(int(handle), size, shareable or fabric)

    def release(self, mem: Memory) -> None:
        self._call(f"cuMemRelease(0x{mem.handle:x})", self._drv.cuMemRelease, mem.handle)
        PHYSICAL.released(mem.handle)

    def export_fd(self, mem: Memory) -> int:
        types = self._drv.CUmemAllocationHandleType
        return int(self._call(f"cuMemExportToShareableHandle(0x{mem.handle:x}, POSIX_FD)",
                              self._drv.cuMemExportToShareableHandle, mem.handle,
                              types.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0))

    def import_fd(self, fd: int, size: int) -> Memory:
        """Import a received fd (closed here: the handle holds its own reference)."""
        types = self._drv.CUmemAllocationHandleType
        try:
            handle = self._call(f"cuMemImportFromShareableHandle(fd {fd}, POSIX_FD)",
                                self._drv.cuMemImportFromShareableHandle, fd,
                                types.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
        finally:
            os.close(fd)
        return Memory(int(handle), size)

    def export_fabric(self, mem: Memory) -> bytes:
        """64-byte fabric handle (multi-node NVLink through IMEX; not run here)."""
        types = self._drv.CUmemAllocationHandleType
        handle = self._call(f"cuMemExportToShareableHandle(0x{mem.handle:x}, FABRIC)",
                            self._drv.cuMemExportToShareableHandle, mem.handle,
                            types.CU_MEM_HANDLE_TYPE_FABRIC, 0)
        return bytes(handle.data)

    def import_fabric(self, data: bytes, size: int) -> Memory:
        if len(data) != FABRIC_HANDLE_BYTES:
            raise VmmError(f"a fabric handle has {FABRIC_HANDLE_BYTES} bytes, got {len(data)}")
        d = self._drv
        fabric = d.CUmemFabricHandle()
        fabric.data = data
        handle = self._call("cuMemImportFromShareableHandle(FABRIC)",
                            d.cuMemImportFromShareableHandle, fabric.getPtr(),
                            d.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_FABRIC)
        return Memory(int(handle), size)

    def reserve(self, size: int) -> int:
        return int(self._call(f"cuMemAddressReserve({size}, {self.granularity})",
                              self._drv.cuMemAddressReserve, size, self.granularity, 0, 0))

    def map(self, addr: int, mem: Memory, offset: int, size: int, writable: bool = True) -> None:
        if offset != 0 or size != mem.size:
            raise VmmError(f"GPU mappings cover whole allocations: asked for [{offset}, "
                           f"{offset + size}) of {mem.size} bytes")
        self._call(f"cuMemMap(0x{addr:x}, {size}, handle 0x{mem.handle:x})", self._drv.cuMemMap,
                   addr, size, 0, mem.handle, 0)
        PHYSICAL.mapped(addr, mem.handle)

    def set_access(self, addr: int, size: int, writable: bool = True) -> None:
        self._call(f"cuMemSetAccess(0x{addr:x}, {size})", self._drv.cuMemSetAccess, addr, size,
                   [self._access], 1)

    def unmap(self, addr: int, size: int) -> None:
        self._call(f"cuMemUnmap(0x{addr:x}, {size})", self._drv.cuMemUnmap, addr, size)
        PHYSICAL.unmapped(addr)

    def free(self, addr: int, size: int) -> None:
        self._call(f"cuMemAddressFree(0x{addr:x}, {size})", self._drv.cuMemAddressFree, addr, size)

    def _mapped(self, mem: Memory) -> int:
        addr = self.reserve(mem.size)
        try:
            self.map(addr, mem, 0, mem.size)
            try:
                self.set_access(addr, mem.size)
            except BaseException:
                self.unmap(addr, mem.size)
                raise
        except BaseException:
            self.free(addr, mem.size)
            raise
        return addr

    def resident(self, mem: Memory) -> torch.Tensor:
        """The owner's uint8 view of ``mem``; unmapped when the last tensor over it is gone."""
        addr = self._mapped(mem)
        size = mem.size

        def unmap() -> None:
            torch.cuda.synchronize(self.device)  # no kernel may still read it
            self.unmap(addr, size)
            self.free(addr, size)

        return self._wrap(_CudaArray(addr, size, unmap), addr, size)

    def map_peer(self, mem: Memory) -> tuple[int, Any]:
        """Map an imported allocation; the imported handle is released (the mapping holds the
        memory)."""
        try:
            addr = self._mapped(mem)
        finally:
            self.release(mem)
        return addr, mem.size

    def unmap_peer(self, addr: int, size: int, keepalive: Any) -> None:
        self.unmap(addr, size)
        self.free(addr, size)

    def _wrap(self, array: _CudaArray, addr: int, nbytes: int) -> torch.Tensor:
        t = torch.as_tensor(array, device=self.device)
        if t.data_ptr() != addr or t.numel() != nbytes or t.device != self.device:
            raise VmmError(f"torch wrapped 0x{addr:x} ({nbytes} bytes) as {t.device} "
                           f"0x{t.data_ptr():x} ({t.numel()} bytes)")
        return t

    def tensor(self, addr: int, nbytes: int) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8, device=self.device)
        return self._wrap(_CudaArray(addr, nbytes), addr, nbytes)

    def fill(self, addr: int, nbytes: int, byte: int) -> None:
        self._call(f"cuMemsetD8(0x{addr:x}, {byte}, {nbytes})", self._drv.cuMemsetD8, addr,
                   byte, nbytes)

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        self._call(f"cuMemcpy(0x{dst:x} <- 0x{src:x}, {nbytes})", self._drv.cuMemcpy, dst, src,
                   nbytes)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)
