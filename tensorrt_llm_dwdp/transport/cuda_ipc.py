"""CUDA IPC transport: peers map this rank's device memory through cudaIpc handles.

A handle names a whole ``cudaMalloc`` allocation, and PyTorch's caching allocator packs many
tensors into one, so ``export`` takes the handle of the allocation base and records the tensor's
offset in it (found with ``cuMemGetAddressRange``). Each distinct allocation of a peer is opened
once (reference counted by the base class) and closed on ``close``.
Memory from ``expandable_segments`` (cuMemCreate) cannot be shared this way: keep
``PYTORCH_CUDA_ALLOC_CONF`` free of it on DWDP ranks.
"""
from __future__ import annotations

import ctypes
import logging
from typing import Any, Sequence

import torch

from tensorrt_llm_dwdp.dwdp.errors import DwdpRegistrationError
from tensorrt_llm_dwdp.transport.base import HandleRecord, Transport

logger = logging.getLogger(__name__)

_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)


def cuda_bindings() -> tuple[Any, Any]:
    """``(cuda.bindings.runtime, cuda.bindings.driver)``, imported on first use."""
    try:
        from cuda.bindings import driver, runtime
    except ImportError as exc:
        raise ImportError(
            "DWDP on GPUs needs cuda.bindings: pip install 'tensorrt_llm_dwdp[cuda]' "
            "(cuda-python >= 12.6)"
        ) from exc
    return runtime, driver


def check(result: Any, what: str, error: type[Exception] = RuntimeError) -> Any:
    """Unpack a cuda.bindings ``(err, *values)`` tuple, raising ``error`` naming ``what`` on
    failure."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise error(f"{what} failed: {err!r}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class CudaIpcTransport(Transport):
    """Device memory of one GPU shared with the group through CUDA IPC."""

    kind = "cuda_ipc"

    def __init__(self, device: torch.device | str) -> None:
        super().__init__()
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CudaIpcTransport needs a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._rt, self._drv = cuda_bindings()
        self._closed = False

    def allocate(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(tuple(shape), dtype=dtype, device=self.device)

    def export(self, tensor: torch.Tensor) -> HandleRecord:
        if tensor.device != self.device:
            raise DwdpRegistrationError(
                f"tensor is on {tensor.device}, but this DWDP rank shares {self.device}"
            )
        ptr, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        with torch.cuda.device(self.device):
            base, size = check(self._drv.cuMemGetAddressRange(ptr),
                               f"cuMemGetAddressRange(0x{ptr:x})")
            base, size = int(base), int(size)
            try:
                handle = check(self._rt.cudaIpcGetMemHandle(base),
                               f"cudaIpcGetMemHandle(0x{base:x})")
            except RuntimeError as exc:
                raise DwdpRegistrationError(
                    f"cannot share tensor at 0x{ptr:x} over CUDA IPC ({exc}); memory from "
                    f"PYTORCH_CUDA_ALLOC_CONF=expandable_segments or cudaMallocAsync pools is not "
                    f"IPC-capable: allocate with DwdpManager.allocate under the default allocator"
                ) from exc
        # The handle struct is opaque in cuda.bindings 13 (no ``reserved`` field): copy its bytes.
        raw = ctypes.string_at(handle.getPtr(), _HANDLE_BYTES)
        return HandleRecord(self.kind, f"{self.device.index}:0x{base:x}", raw, size, ptr - base,
                            nbytes, self.device.index)

    def _map(self, record: HandleRecord) -> int:
        if len(record.handle) != _HANDLE_BYTES:
            raise ValueError(f"CUDA IPC handle of {len(record.handle)} bytes, expected 64")
        handle = self._rt.cudaIpcMemHandle_t()
        ctypes.memmove(handle.getPtr(), record.handle, _HANDLE_BYTES)
        with torch.cuda.device(self.device):
            ptr = check(
                self._rt.cudaIpcOpenMemHandle(handle, self._rt.cudaIpcMemLazyEnablePeerAccess),
                f"cudaIpcOpenMemHandle(allocation {record.allocation} of GPU {record.device})",
            )
        return int(ptr)

    def _unmap(self, base: int, record: HandleRecord) -> None:
        with torch.cuda.device(self.device):
            check(self._rt.cudaIpcCloseMemHandle(base), f"cudaIpcCloseMemHandle(0x{base:x})")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.close_peers()
