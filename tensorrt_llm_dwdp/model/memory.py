"""Memory a model's routed experts take on a rank, measured, not computed from shapes.

``in_use(device)`` reads what the process holds: on a GPU the caching allocator's live bytes
(``torch.cuda.memory_allocated``: every tensor, rounded to its 512-byte block) plus the device
memory it created through CUDA VMM (``dwdp/vmm.py``: the composite view's own allocations and
prefetch pages, which the allocator never sees; peers' imported memory is not counted), on the
CPU the resident anonymous + shared-memory pages (``RssAnon + RssShmem`` of /proc/self/status, after a
``gc`` and ``malloc_trim`` so freed memory is handed back; code and memory-mapped checkpoint
pages are not counted). A rank's expert memory is the reading after loading (DWDP: after the
exchange, so its prefetch buffers are in) minus the reading before, minus what the same model
WITHOUT routed experts takes (``dense_model_bytes``: built, touched, measured and freed).

``RESOLUTION_BYTES`` says how small a difference each source can resolve: reports do not judge
a figure below it (RSS moves by allocator arenas and Python objects, the CUDA allocator by
blocks).
"""
from __future__ import annotations

import ctypes
import gc
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

CUDA_ALLOCATOR = "cuda_allocator"
RSS = "rss"
RESOLUTION_BYTES = {CUDA_ALLOCATOR: 1 << 20, RSS: 16 << 20}


@dataclass(frozen=True)
class MemoryReading:
    """Bytes in use and where the figure comes from (``cuda_allocator`` or ``rss``)."""

    nbytes: int
    source: str

    def __sub__(self, other: "MemoryReading") -> int:
        if other.source != self.source:
            raise ValueError(f"cannot subtract a {other.source} reading from a {self.source} one")
        return self.nbytes - other.nbytes


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure is just noisier
        pass


def _rss_bytes() -> int:
    fields = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssShmem"):
                fields[key] = int(rest.split()[0]) * 1024
    if len(fields) != 2:
        raise RuntimeError("/proc/self/status lacks RssAnon/RssShmem: cannot measure CPU memory")
    return fields["RssAnon"] + fields["RssShmem"]


def in_use(device: torch.device | str) -> MemoryReading:
    """What this process holds now on ``device`` (see the module docstring)."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        from tensorrt_llm_dwdp.dwdp.vmm import physical_bytes

        return MemoryReading(int(torch.cuda.memory_allocated(device)) + physical_bytes(device), CUDA_ALLOCATOR)
    _malloc_trim()
    return MemoryReading(_rss_bytes(), RSS)


def dense_model_bytes(config, device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes the decoder of ``config`` takes on ``device`` WITHOUT routed experts (attention,
    dense MLPs, shared experts, routers, embeddings): built, every tensor written (so CPU pages
    are resident), measured, freed. Built twice, measured the second time: the first build
    pays one-time costs (imports, allocator arenas) a loaded model does not hold."""
    from tensorrt_llm_dwdp.model.builder import build_model
    from tensorrt_llm_dwdp.model.moe_block import make_moe

    device = torch.device(device)
    for _ in range(2):
        before = in_use(device)
        with torch.device("meta"):
            model = build_model(config, lambda i: make_moe(config, i, "torch"), dtype)
        model = model.to_empty(device=device)
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                t.zero_()
        after = in_use(device)
        del model
        gc.collect()
    return after - before
