"""DWDP's peer copies: how long a layer's prefetch takes and what it costs the compute it overlaps.

Each rank pulls ``(S-1)*P`` experts per MoE layer, P from each peer, over NVLink, with copy
engines (no SMs). Terms:

- bandwidth: the destination's NVLink ingress times the copy-engine efficiency (a measured
  fraction of the link's nominal figure);
- contention: without ``contention_opt`` each rank pulls peer after peer, so a source may serve
  several pullers at once and split its egress; with ranks running free, another rank is pulling
  from the same source with probability ``busy / (S-1)`` each, where ``busy`` is the fraction of
  a layer a rank spends copying. The expected stretch is ``1 + (S-2) * busy / (S-1)``. With
  ``contention_opt`` (slices round-robin over the pullers) every source's egress is shared
  evenly and the ingress bound alone sets the time;
- interference: compute that runs while copies are in flight is slowed by a measured fraction.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CopyParams:
    """Measured constants of the copy model (their source is reported with every plan)."""

    efficiency: float        # achieved / nominal peer-copy bandwidth
    interference: float      # fractional slowdown of compute that overlaps a copy
    source: str


@dataclass(frozen=True)
class LayerCopy:
    """One MoE layer's prefetch on one rank, in milliseconds."""

    copy_ms: float           # time to land the layer's remote experts
    exposed_ms: float        # part not hidden behind the layer's compute window
    interference_ms: float   # compute slowdown while the copy runs
    contention: float        # stretch factor applied for source-side contention


def layer_copy(bytes_per_layer: float, window_ms: float, dwdp_size: int, link_bw: float,
               params: CopyParams, contention_opt: bool) -> LayerCopy:
    """The prefetch of ``bytes_per_layer`` hidden behind ``window_ms`` of compute (one MoE
    layer plus the next attention), on a group of ``dwdp_size`` ranks joined by ``link_bw``
    bytes/s per GPU and direction."""
    if dwdp_size < 2 or bytes_per_layer <= 0:
        return LayerCopy(0.0, 0.0, 0.0, 1.0)
    base_ms = bytes_per_layer / (link_bw * params.efficiency) * 1e3
    stretch = 1.0
    if not contention_opt and dwdp_size > 2:
        busy = min(1.0, base_ms / window_ms) if window_ms > 0 else 1.0
        stretch = 1.0 + (dwdp_size - 2) * busy / (dwdp_size - 1)
    copy_ms = base_ms * stretch
    overlapped = min(copy_ms, window_ms)
    return LayerCopy(copy_ms=copy_ms, exposed_ms=max(0.0, copy_ms - window_ms),
                     interference_ms=params.interference * overlapped, contention=stretch)
