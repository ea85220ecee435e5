"""ManagedExperts: a rank's own host experts in CUDA managed memory, read in place by kernels.

The UVM read-through variant of offload (``host_offload: uvm``), for comparison with prefetch:
each (layer, tensor) gets ``cudaMallocManaged`` memory advised ``SetPreferredLocation = host``
and ``SetAccessedBy = this GPU``, so pages stay in host memory and the GPU reads them over PCIe
through its page tables (no migration, no copy stream). The weight view holds these tensors
directly (``PrefetchBuffers(host_tensors=...)``). Every GEMM tile that reads an expert crosses
PCIe again, so it pays off only while few tokens reuse each expert.

``prefer_device`` turns the same memory into UVM with migration: the GPU becomes the preferred
location and every range is prefetched there (``cudaMemPrefetchAsync``), so kernels read device
memory; it then holds device memory like resident experts do. The offload benchmark times both
beside prefetch (``bench/tiers.py offload``).

Managed memory counts against the device's free memory in the driver's bookkeeping on some
systems; asking for more than is free can evict other tenants' memory, so the total is checked
against ``cudaMemGetInfo`` first and refused with the numbers.
"""
from __future__ import annotations

import ctypes
import logging
from typing import Mapping, Sequence

import torch

from tensorrt_llm_dwdp.dwdp.config import DwdpConfigError

logger = logging.getLogger(__name__)

FREE_FRACTION = 0.9


class _CudaArray:
    """The minimal ``__cuda_array_interface__`` torch needs to view raw device memory."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (ptr, False), "version": 3, "strides": None}


def managed_tensor(ptr: int, nbytes: int, dtype: torch.dtype, shape: Sequence[int],
                   device: torch.device) -> torch.Tensor:
    """A tensor viewing ``nbytes`` at ``ptr`` (not owned: free the memory after the tensor)."""
    raw = torch.as_tensor(_CudaArray(ptr, nbytes), device=device)
    return raw.view(dtype).view(tuple(shape))


class ManagedExperts:
    """``tensors[pos][name]``: the H host experts of layer ``pos`` in managed memory, filled
    from the host store (global experts from ``first``)."""

    def __init__(self, device: torch.device, store, own: Sequence[Mapping[str, torch.Tensor]],
                 host_experts: int, first: int) -> None:
        from tensorrt_llm_dwdp.transport.cuda_ipc import check, cuda_bindings

        self._rt, _ = cuda_bindings()
        self._check = check
        self.device = device
        rt = self._rt
        sizes = [{name: host_experts * t[0].numel() * t.element_size() for name, t in layer.items()}
                 for layer in own]
        total = sum(n for layer in sizes for n in layer.values())
        with torch.cuda.device(device):
            free, card = check(rt.cudaMemGetInfo(), "cudaMemGetInfo")
        if total > FREE_FRACTION * free:
            raise DwdpConfigError(
                f"host_offload: uvm needs {total / 2**30:.2f} GiB of managed memory for "
                f"{host_experts} host experts per layer, but {device} has {free / 2**30:.2f} GiB "
                f"free of {card / 2**30:.2f} GiB (at most {FREE_FRACTION:.0%} of free is asked "
                f"for): use fewer host_experts_per_worker or host_offload: prefetch")
        host_loc = rt.cudaMemLocation()
        host_loc.type = rt.cudaMemLocationType.cudaMemLocationTypeHost
        host_loc.id = 0
        dev_loc = rt.cudaMemLocation()
        dev_loc.type = rt.cudaMemLocationType.cudaMemLocationTypeDevice
        dev_loc.id = device.index
        advise = rt.cudaMemoryAdvise
        self._ptrs: list[int] = []
        self._sizes: list[int] = []
        self._dev_loc = dev_loc
        self.placement = "host"
        self.tensors: list[dict[str, torch.Tensor]] = []
        try:
            with torch.cuda.device(device):
                for pos, layer in enumerate(own):
                    row = {}
                    for name, t in layer.items():
                        n = sizes[pos][name]
                        ptr = int(check(rt.cudaMallocManaged(n, rt.cudaMemAttachGlobal),
                                        f"cudaMallocManaged({n})"))
                        self._ptrs.append(ptr)
                        self._sizes.append(n)
                        check(rt.cudaMemAdvise(ptr, n, advise.cudaMemAdviseSetPreferredLocation,
                                               host_loc), "cudaMemAdvise(SetPreferredLocation)")
                        check(rt.cudaMemAdvise(ptr, n, advise.cudaMemAdviseSetAccessedBy, dev_loc),
                              "cudaMemAdvise(SetAccessedBy)")
                        ctypes.memmove(ptr, store.address(pos, name, first), n)
                        row[name] = managed_tensor(ptr, n, t.dtype,
                                                   (host_experts,) + tuple(t.shape[1:]), device)
                    self.tensors.append(row)
        except BaseException:
            self.close()
            raise
        self.nbytes = total
        logger.info("UVM read-through: %.1f MiB of host experts in managed memory on %s",
                    total / 2**20, device)

    def prefer_device(self) -> None:
        """Advise the GPU as every range's preferred location and migrate the pages there
        (prefetch on the current stream, then wait): UVM with migration instead of
        read-through. Idempotent."""
        rt, check = self._rt, self._check
        advise = rt.cudaMemoryAdvise
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device).cuda_stream
            for ptr, n in zip(self._ptrs, self._sizes):
                check(rt.cudaMemAdvise(ptr, n, advise.cudaMemAdviseSetPreferredLocation,
                                       self._dev_loc), "cudaMemAdvise(SetPreferredLocation)")
                check(rt.cudaMemPrefetchAsync(ptr, n, self._dev_loc, 0, stream),
                      "cudaMemPrefetchAsync(device)")
            torch.cuda.current_stream(self.device).synchronize()
        self.placement = "device"
        logger.info("UVM: %.1f MiB of host experts migrated to %s", self.nbytes / 2**20,
                    self.device)

    def close(self) -> None:
        """Free the managed memory (the tensors viewing it must not be used afterwards)."""
        self.tensors = []
        ptrs, self._ptrs = self._ptrs, []
        if not ptrs:
            return
        with torch.cuda.device(self.device):
            torch.cuda.synchronize(self.device)
            for ptr in ptrs:
                self._check(self._rt.cudaFree(ptr), f"cudaFree(managed 0x{ptr:x})")
