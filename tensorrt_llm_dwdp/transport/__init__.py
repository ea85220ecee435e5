"""Memory peers can map: POSIX shared memory (CPU ranks) and CUDA IPC (GPU ranks)."""
from __future__ import annotations

import torch

from tensorrt_llm_dwdp.transport.base import HandleRecord, Transport
from tensorrt_llm_dwdp.transport.shm import ShmTransport

__all__ = ["HandleRecord", "ShmTransport", "Transport", "transport_for"]


def transport_for(device: torch.device | str) -> Transport:
    """The transport of a rank whose experts live on ``device`` (cpu -> shm, cuda -> IPC)."""
    device = torch.device(device)
    if device.type == "cpu":
        return ShmTransport()
    if device.type == "cuda":
        from tensorrt_llm_dwdp.transport.cuda_ipc import CudaIpcTransport

        return CudaIpcTransport(device)
    raise ValueError(f"DWDP shares experts on cpu or cuda devices, got {device}")
