"""DWDP's peer copies: how long a layer's prefetch takes and what it costs the compute it overlaps.

Each rank pulls ``(S-1)*P`` experts per MoE layer, P from each peer, over NVLink, with copy
engines (no SMs). Terms:

- bandwidth: the destination's NVLink ingress times the copy-engine efficiency (a measured
  fraction of the link's nominal figure);
- contention: without ``contention_opt`` each rank pulls peer after peer, so a source may serve
  several pullers at once and split its egress. With ranks running free, each of the S-2 other
  pullers is copying with probability ``busy`` (the fraction of its layer window it spends
  copying, uncontended) and then pulls from this source with probability ``1 / (S-1)``; averaged
  over the sources, the expected stretch is ``1 + (S-2) / (S-1) * peer_busy``, with
  ``peer_busy`` the mean ``busy`` of the other ranks. In a saturated group the ranks are alike
  and a rank's own ``busy`` stands for its peers'; in a request stream a peer may be idle (no
  copy at all) or running a different step, and the stream passes the peers' actual duty.
  With ``contention_opt`` (slices round-robin over the pullers) every source's egress is shared
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
    busy: float              # this rank's copy duty: uncontended copy time / window, at most 1


def layer_copy(bytes_per_layer: float, window_ms: float, dwdp_size: int, link_bw: float,
               params: CopyParams, contention_opt: bool,
               peer_busy: float | None = None) -> LayerCopy:
    """The prefetch of ``bytes_per_layer`` hidden behind ``window_ms`` of compute (one MoE
    layer plus the next attention), on a group of ``dwdp_size`` ranks joined by ``link_bw``
    bytes/s per GPU and direction. ``peer_busy`` (0..1) is the mean copy duty of the other
    ranks; None: the same as this rank's (a saturated group of alike ranks)."""
    if dwdp_size < 2 or bytes_per_layer <= 0:
        return LayerCopy(0.0, 0.0, 0.0, 1.0, 0.0)
    base_ms = bytes_per_layer / (link_bw * params.efficiency) * 1e3
    busy = min(1.0, base_ms / window_ms) if window_ms > 0 else 1.0
    if peer_busy is not None and not 0.0 <= peer_busy <= 1.0:
        raise ValueError(f"peer_busy {peer_busy} must be in [0, 1]")
    stretch = 1.0
    if not contention_opt and dwdp_size > 2:
        others = busy if peer_busy is None else peer_busy
        stretch = 1.0 + (dwdp_size - 2) * others / (dwdp_size - 1)
    copy_ms = base_ms * stretch
    overlapped = min(copy_ms, window_ms)
    return LayerCopy(copy_ms=copy_ms, exposed_ms=max(0.0, copy_ms - window_ms),
                     interference_ms=params.interference * overlapped, contention=stretch,
                     busy=busy)
