"""ExpertMemory: where a rank's registered expert tensors live, and what registering one checks.

Under the composite view the memory is page allocations shared by handle (``transport.vmm``):
each ``[W - H, ...]`` tensor sits ``data_offset`` bytes into an allocation of the composite
layout's size (``composite_layout.CompositeRange``), so mapping the allocation a second time
into the layer's range puts its experts where one rank holding all experts has them; a tensor
registered from other memory is refused, naming it. Under the multi view it is the device's
plain transport (POSIX shm on CPU, CUDA IPC on GPU). ``check_tensor`` holds the checks every
registered tensor passes first.
"""
from __future__ import annotations

from typing import Sequence

import torch

from tensorrt_llm_dwdp.dwdp.composite_layout import CompositeRange, check_page_bytes
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig, DwdpConfigError
from tensorrt_llm_dwdp.dwdp.errors import DwdpRegistrationError
from tensorrt_llm_dwdp.dwdp.tiers import TierLayout
from tensorrt_llm_dwdp.transport import HandleRecord, Transport, transport_for


class ExpertMemory:
    """The transport of one rank's expert tensors (given, or chosen by view and device) and,
    under the composite view, the page size (``page_bytes``; 0 under multi)."""

    def __init__(self, config: DwdpConfig, tiers: TierLayout, device: torch.device,
                 composite: bool, transport: Transport | None = None) -> None:
        self.config = config
        self.tiers = tiers
        self.device = device
        self.composite = composite
        self.page_bytes = 0
        if transport is None:
            transport = self._vmm_transport() if composite else transport_for(device)
        self.transport = transport

    def _vmm_transport(self) -> Transport:
        from tensorrt_llm_dwdp.dwdp.vmm import vmm_for
        from tensorrt_llm_dwdp.transport.vmm import VmmTransport

        vmm = vmm_for(self.device)
        page = self.config.view_page_bytes or vmm.granularity
        try:
            self.page_bytes = check_page_bytes(page, vmm.minimum_granularity,
                                               "dwdp_config.view_page_bytes")
        except ValueError as exc:
            raise DwdpConfigError(f"{exc} (device {self.device}); use 0 or a power-of-two "
                                  f"multiple of {vmm.minimum_granularity}") from exc
        return VmmTransport(vmm, self.config.view_handles, self.config.peer_timeout_s)

    def composite_range(self, shape: Sequence[int], dtype: torch.dtype) -> CompositeRange | None:
        """The composite layout of a ``[W - H, ...]`` tensor (None for other shapes)."""
        if not shape or shape[0] != self.tiers.resident_experts:
            return None
        nbytes = torch.empty(tuple(shape), dtype=dtype, device="meta").nbytes
        eb = nbytes // shape[0]
        return (CompositeRange.of(self.tiers.layout, eb, self.page_bytes, self.tiers.host_experts)
                if eb else None)

    def allocate(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A zeroed tensor peers can map (under composite, placed for its second mapping)."""
        if self.composite:
            r = self.composite_range(shape, dtype)
            if r is not None:
                return self.transport.allocate_at(shape, dtype, r.data_offset,
                                                  r.allocation_bytes)
        return self.transport.allocate(shape, dtype)

    def export(self, t: torch.Tensor) -> HandleRecord:
        """``t``'s handle record for the peers; DwdpRegistrationError if it cannot be shared
        (under composite: unless it is memory from ``allocate``)."""
        if self.composite:
            r = self.composite_range(tuple(t.shape), t.dtype)
            if r is None:
                raise DwdpRegistrationError("expert_view composite needs at least one byte per "
                                            "expert")
            mem, offset = self.transport.locate(t)
            if (offset, mem.size) != (r.data_offset, r.allocation_bytes):
                raise DwdpRegistrationError(
                    f"its allocation ({mem.size} bytes, tensor at byte {offset}) is not the one "
                    f"the composite view maps ({r.allocation_bytes} bytes, tensor at byte "
                    f"{r.data_offset}): allocate it with DwdpManager.allocate(shape, dtype)")
        return self.transport.export(t)


def check_tensor(layer_idx: int, name: object, t: object, device: torch.device,
                 tiers: TierLayout) -> str:
    """Raise DwdpRegistrationError unless ``t`` can be registered as tensor ``name`` of layer
    ``layer_idx``: a non-empty str name, a contiguous tensor on ``device`` whose dim 0 is the
    rank's resident experts. Returns ``"layer i tensor 'name'"`` (for later messages)."""
    if not isinstance(name, str) or not name:
        raise DwdpRegistrationError(
            f"layer {layer_idx}: tensor names must be non-empty str, got {name!r}")
    where = f"layer {layer_idx} tensor {name!r}"
    if not isinstance(t, torch.Tensor):
        raise DwdpRegistrationError(f"{where} is a {type(t).__name__}, not a torch.Tensor")
    if t.device != device:
        raise DwdpRegistrationError(f"{where} is on {t.device}, expected {device}")
    w = tiers.resident_experts
    if t.dim() < 1 or t.shape[0] != w:
        raise DwdpRegistrationError(
            f"{where} has shape {tuple(t.shape)}; dim 0 must be "
            + (f"num_experts_per_worker = {w}" if not tiers.host_experts else
               f"num_experts_per_worker - host_experts_per_worker = {w}"))
    if not t.is_contiguous():
        raise DwdpRegistrationError(
            f"{where} is not contiguous (strides {t.stride()}); peers copy raw bytes")
    return where
