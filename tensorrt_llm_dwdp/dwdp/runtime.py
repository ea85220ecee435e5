"""PrefetchRuntime: what a rank's exchange builds -- its weight views, where every prefetch reads
from, the failover watch, the copy plans and the copy engine that runs them -- and the step
protocol over them (``steps.StepSequencer``).

Views: ``composite`` maps each layer into one ``[E, ...]`` range per tensor and buffer
(``composite_views``; ``views`` are slices of it), ``multi`` keeps the own tensors and one
buffer per peer (``prefetch_buffer``; with ``host_offload: uvm`` the own host experts are read
in place from managed memory, ``uvm.py``). One rank without offload has nothing to prefetch: its
views are its own tensors and there is no engine. Sources (``sources.SourceTable``): peer memory
as mapped at the exchange, the host store for peers down and for offloaded experts; a failover
or rejoin (``failover.PeerWatch``) switches them and the plans are rebuilt. The views stay.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch

from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.dwdp.copy_plan import CopyPlan
from tensorrt_llm_dwdp.dwdp.failover import PeerWatch
from tensorrt_llm_dwdp.dwdp.prefetch_buffer import NUM_BUFFERS, PrefetchBuffers
from tensorrt_llm_dwdp.dwdp.sources import PeerBases, SourceTable, TierEvent
from tensorrt_llm_dwdp.dwdp.stats import StatsRecorder
from tensorrt_llm_dwdp.dwdp.steps import StepSequencer
from tensorrt_llm_dwdp.dwdp.tiers import Place, TierLayout, slot_place
from tensorrt_llm_dwdp.transport import Transport

logger = logging.getLogger(__name__)


class PrefetchRuntime:
    """Views, sources, plans, engine and step protocol of one rank after its exchange.

    ``own[pos]``: the registered (resident) tensors of layer position ``pos``; ``bases``: the
    peers' tensors as mapped (``[pos][peer][name]``); ``handles``: their records by peer;
    ``host``: the rank's ``HostTiers`` or None; ``record``: its exchange record (what a rejoined
    peer must match); ``down`` / ``seen``: peers not read from the start / the incarnation of
    each peer mapped. ``shared`` False: one rank without offload (nothing to copy). On failure
    everything built so far is released.
    """

    def __init__(self, config: DwdpConfig, tiers: TierLayout, layers: Sequence[int],
                 own: Sequence[Mapping[str, torch.Tensor]], device: torch.device,
                 transport: Transport, *, shared: bool, composite: bool, page_bytes: int,
                 bases: PeerBases, handles: Mapping[int, Any], host: Any, record: dict | None,
                 events: list[TierEvent], stats: StatsRecorder, down: Sequence[int] = (),
                 seen: Mapping[int, int] | None = None) -> None:
        self.config = config
        self.tiers = tiers
        self.layout = tiers.layout
        self.rank = self.layout.rank
        self.own = list(own)
        self.device = device
        self.stats = stats
        self.views: list[list[dict[str, list[torch.Tensor]]]] | None = None
        self.composite_views: list[list[dict[str, torch.Tensor]]] | None = None
        self.composite: Any = None           # composite_views.CompositeViews
        self.buffers: PrefetchBuffers | None = None
        self.uvm: Any = None                 # uvm.ManagedExperts with host_offload: uvm
        self.sources: SourceTable | None = None
        self.watch: PeerWatch | None = None
        self.engine: Any = None
        self.steps: StepSequencer | None = None
        if not shared:
            self.views = [[{n: [t] for n, t in d.items()}] * NUM_BUFFERS for d in self.own]
            self.composite_views = [[dict(d)] * NUM_BUFFERS for d in self.own]
            self.steps = StepSequencer(layers, None, stats)
            return
        try:
            self._build(transport, composite, page_bytes, bases, handles, host, record, events,
                        down, seen)
            self.steps = StepSequencer(layers, self.engine, stats)
            self.rebuild_plans()
        except BaseException:
            self.close()
            raise

    def _build(self, transport: Transport, composite: bool, page_bytes: int, bases: PeerBases,
               handles: Mapping[int, Any], host: Any, record: dict | None,
               events: list[TierEvent], down: Sequence[int], seen: Mapping[int, int] | None
               ) -> None:
        h = self.tiers.host_experts
        expert_bytes = [{name: t[0].numel() * t.element_size() for name, t in d.items()}
                        for d in self.own]
        uvm_tensors = None
        if h and self.config.host_offload == "uvm":
            from tensorrt_llm_dwdp.dwdp.uvm import ManagedExperts

            self.uvm = ManagedExperts(self.device, host.store, self.own, h,
                                      self.tiers.host_range()[0])
            uvm_tensors = self.uvm.tensors
        self.sources = SourceTable(self.config, self.tiers, expert_bytes, bases, handles, host,
                                   own_host_copied=uvm_tensors is None)
        self.sources.down.update(down)
        self.sources.seen.update(seen if seen is not None else {p: 1 for p in self.layout.peers})
        if host is not None:  # what this rank reads from host memory from the start
            host.verify_sources(self.sources.ranges(), f"DWDP rank {self.rank} start-up")
            self.watch = PeerWatch(self.rank, host, self.sources, transport, self.stats, record,
                                   events)
        n = len(self.own)
        if composite:
            from tensorrt_llm_dwdp.dwdp.composite_views import CompositeViews

            self.composite = CompositeViews(transport.vmm, self.tiers, self.own,
                                            transport.locate, page_bytes)
            edges = self.composite.copy_edges(
                [c for pos in range(n)
                 for link in self.sources.copies(pos, self.composite.edge_place(pos))
                 for c in link])
            logger.debug("DWDP rank %d: %d edge byte(s) filled from peers", self.rank, edges)
            self.views = [[self.composite.multi_view(pos, b) for b in range(NUM_BUFFERS)]
                          for pos in range(n)]
            self.composite_views = [[self.composite.view(pos, b) for b in range(NUM_BUFFERS)]
                                    for pos in range(n)]
        else:
            self.buffers = PrefetchBuffers(self.layout, self.own, self.device, h, uvm_tensors)
            self.views = [[self.buffers.view(pos, b) for b in range(NUM_BUFFERS)]
                          for pos in range(n)]
        if self.device.type == "cuda":
            from tensorrt_llm_dwdp.dwdp.copy_engine import CudaCopyEngine

            self.engine = CudaCopyEngine(self.device, self.stats, self.config.contention_opt)
        else:
            from tensorrt_llm_dwdp.dwdp.copy_engine import ThreadCopyEngine

            self.engine = ThreadCopyEngine(self.stats, name=f"dwdp-copy-r{self.rank}")

    # ------------------------------------------------------------------ sources and plans
    def rebuild_plans(self) -> None:
        """Plans for every (layer, buffer) from the current sources."""
        if self.composite is not None:
            place = self.composite.place
        else:
            def place(pos: int, b: int) -> Place:
                return slot_place(lambda slot, name: self.buffers.dst(pos, b, slot, name)[0])
        self.steps.set_plans(*self.sources.plans(NUM_BUFFERS, place))

    def watch_peers(self, at: str) -> bool:
        """Fail over dead peers, take rejoined ones back (``failover.PeerWatch``); True if a
        peer this rank read died (the step's outputs are suspect; queued prefetches are
        dropped, to be queued again from the new sources)."""
        switched, died = self.watch.check(at, self.engine.synchronize)
        if switched:
            self.rebuild_plans()
        if died:
            self.steps.requeue()  # re-queue what may have read it (a step boundary)
        return died

    @property
    def peers_down(self) -> tuple[int, ...]:
        return tuple(sorted(self.sources.down)) if self.sources is not None else ()

    @property
    def buffer_bytes(self) -> int:
        if self.composite is not None:
            return self.composite.buffer_bytes
        return self.buffers.total_bytes if self.buffers is not None else 0

    def copy_plans(self) -> list[CopyPlan]:
        return [plan for row in self.steps.plans for plan in row]

    def poison(self, byte: int) -> None:
        """Fill every prefetch buffer or pool with ``byte`` (a missed copy shows)."""
        target = self.composite if self.composite is not None else self.buffers
        if target is None:
            return
        if self.engine is not None:
            self.engine.synchronize()
        target.fill_(byte)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Stop the engine, then release managed memory and composite ranges (the views are
        invalid after); raises the first error once all of it ran."""
        error: BaseException | None = None
        try:
            if self.engine is not None:
                self.engine.close()
        except Exception as exc:
            error = exc
        self.views = self.composite_views = None
        try:
            if self.uvm is not None:
                self.uvm.close()
            if self.composite is not None:
                self.composite.close()
        except Exception as exc:
            error = error or exc
        self.buffers, self.engine, self.composite = None, None, None
        if self.steps is not None:
            self.steps.set_plans([], [])
        if error is not None:
            raise error
