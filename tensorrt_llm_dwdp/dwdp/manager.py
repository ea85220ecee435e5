"""DwdpManager: registration, handle exchange, ping-pong prefetch and the per-step protocol.

```
mgr = DwdpManager(config, num_experts, comm, device)    # or DwdpManager.from_environment(...)
t = mgr.allocate(shape, dtype)                            # memory peers can map
mgr.register_layer(layer_idx, {"w3_w1_weight": t, ...})   # dim 0 == W for every tensor
mgr.exchange()                                            # one allgather + agreement checks
each step:  mgr.start_step()
            view = mgr.weights(i)   # {name: [S tensors by rank]}; compute waits i's prefetch
            ... compute layer i ...
            mgr.done(i)             # buffer of i refills with the layer two ahead
mgr.close()                                               # or `with mgr:`
```
Layers are prefetched in registration order. The k-th prefetch of the run (k = step * L + pos)
lands in buffer ``k % 2`` (``pos % 2`` when L is even), so the layer two ahead, wrapping into the
next step, refills the buffer the finished layer read. The manager owns the comm it is given.

Two views of a layer (``config.expert_view``): ``multi`` keeps the own slice and one buffer per
peer as separate tensors; ``composite`` maps them into one ``[E, ...]`` range per tensor
(``composite_views``), handed out by ``composite_weights(i)`` -- ``weights(i)`` then returns
slices of it, so multi-tensor callers keep working. Composite needs its memory from
``allocate`` (virtual-memory allocations shared by handle, ``transport.vmm``).

Host tiers (``config.tiers_enabled``, ``tiers.py``): the exchange also builds the node's host
store and control block (``host_tiers.py``); each step checks the peers it reads
(``start_step`` and ``end_step``), moves a dead peer's ranges to the host store (failover:
``end_step`` then raises ``DwdpStepRetry`` and the engine runs the step again), takes a
restarted peer back (rejoin), and with ``host_experts_per_worker`` prefetches part of the rank's
own slice from host memory too (composite: onto pool pages after the resident own experts;
multi: the view then has S + 1 tensors, ``view_offsets``; UVM read-through: multi only). Both views are filled by the same per-peer copies, so a peer's source
switches tiers by switching the address its copies read.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch

from tensorrt_llm_dwdp.dwdp.agreement import record_problems, summarize
from tensorrt_llm_dwdp.comm import GroupComm, connect
from tensorrt_llm_dwdp.dwdp.composite_layout import CompositeRange, check_page_bytes
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig, DwdpConfigError
from tensorrt_llm_dwdp.dwdp.copy_plan import CopyPlan
from tensorrt_llm_dwdp.dwdp.failover import PeerWatch
from tensorrt_llm_dwdp.dwdp.errors import (DwdpError, DwdpMismatchError, DwdpPeerError,
                                           DwdpRegistrationError, DwdpStateError, DwdpStepRetry)
from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout
from tensorrt_llm_dwdp.dwdp.prefetch_buffer import NUM_BUFFERS, PrefetchBuffers
from tensorrt_llm_dwdp.dwdp.sources import SourceTable, TierEvent
from tensorrt_llm_dwdp.dwdp.stats import DwdpStats, StatsRecorder
from tensorrt_llm_dwdp.dwdp.tiers import Place, TierLayout, slot_place
from tensorrt_llm_dwdp.transport import HandleRecord, Transport, transport_for

logger = logging.getLogger(__name__)

_EXCHANGE = "DWDP handle exchange"
_OPEN = "DWDP peer mapping"
_FILL = "DWDP host store fill"
_CLOSE = "DWDP close"


class DwdpManager:
    """One rank's share of a DWDP group: its experts, its peers' mappings, its prefetches."""

    def __init__(self, config: DwdpConfig, num_experts: int, comm: GroupComm,
                 device: torch.device | str = "cpu", transport: Transport | None = None, *,
                 rejoin: Any = None) -> None:
        config.check_num_experts(num_experts)
        if comm.size != config.dwdp_size:
            raise DwdpMismatchError(
                f"the group has {comm.size} rank(s) but dwdp_config.dwdp_size is {config.dwdp_size}"
            )
        self.config = config
        self.num_experts = num_experts
        self.comm = comm
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.layout = ExpertLayout.from_config(config, num_experts, comm.rank)
        self.tier_layout = TierLayout(self.layout, config.host_experts_per_worker)
        self.rank = comm.rank
        # one rank without offload has nothing to map: its own tensors are the whole view
        self._shared = config.dwdp_size > 1 or config.host_experts_per_worker > 0
        self._composite_mode = config.expert_view == "composite" and self._shared
        if config.host_offload == "uvm" and config.host_experts_per_worker \
                and self.device.type != "cuda":
            raise DwdpConfigError("dwdp_config.host_offload: uvm reads host experts through CUDA "
                                  f"managed memory; this rank runs on {self.device}")
        self.page_bytes = 0
        if transport is None:
            transport = (self._vmm_transport() if self._composite_mode
                         else transport_for(self.device))
        self._transport = transport
        self._layers: list[int] = []
        self._pos_of: dict[int, int] = {}
        self._own: list[dict[str, torch.Tensor]] = []
        self._handles: list[dict[str, HandleRecord]] = []
        self._views: list[list[dict[str, list[torch.Tensor]]]] | None = None
        self._composite_views: list[list[dict[str, torch.Tensor]]] | None = None
        self._composite: Any = None
        self._plans: list[list[CopyPlan]] = []
        self._buffers: PrefetchBuffers | None = None
        self._engine: Any = None
        self._stats: StatsRecorder | None = None
        self._n = 0
        self._current = 0   # sequence number of the next layer to compute
        self._queued = 0    # sequence number of the next prefetch to queue
        self._exchange_started = False
        self._peer_failed = False
        self._closed = False
        self._rejoin = rejoin         # host_tiers.RunningGroup when restarting into a live group
        self._host: Any = None        # host_tiers.HostTiers once exchanged (tiers on)
        self._host_parts: list[dict[str, torch.Tensor] | None] = []
        self._uvm: Any = None         # uvm.ManagedExperts with host_offload: uvm
        self._sources: SourceTable | None = None
        self._watch: PeerWatch | None = None
        self._host_bytes: list[list[int]] = []
        self._record: dict | None = None
        self._peer_handles: dict[int, Any] = {}
        self.tier_events: list[TierEvent] = []

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

    def _composite_range(self, shape: Sequence[int], dtype: torch.dtype) -> CompositeRange | None:
        """The composite layout of a ``[W - H, ...]`` tensor (None for other shapes)."""
        if not shape or shape[0] != self.tier_layout.resident_experts:
            return None
        nbytes = torch.empty(tuple(shape), dtype=dtype, device="meta").nbytes
        eb = nbytes // shape[0]
        return (CompositeRange.of(self.layout, eb, self.page_bytes, self.tier_layout.host_experts)
                if eb else None)

    @classmethod
    def from_environment(cls, config: DwdpConfig, num_experts: int,
                         device: torch.device | str = "cpu") -> "DwdpManager":
        """Join the group this process was launched into (mpirun, or TRTLLM_DWDP_* for TCP).

        With host tiers, a process whose group is already running without it (it restarted
        after a crash, same rank and config) rejoins it instead: ``restores_experts`` is then
        True and the slice loads from the node's host store (``restore_layer``).
        """
        from tensorrt_llm_dwdp.dwdp.host_tiers import DetachedComm, find_running_group

        config.check_num_experts(num_experts)
        running = find_running_group(config)
        if running is not None:
            try:
                return cls(config, num_experts, DetachedComm(running.rank, config.dwdp_size),
                           device, rejoin=running)
            except BaseException:
                running.control.close()
                raise
        comm = connect(config)
        try:
            return cls(config, num_experts, comm, device)
        except BaseException:
            comm.close()
            raise

    # ------------------------------------------------------------------ properties
    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @property
    def layer_indices(self) -> tuple[int, ...]:
        """Registered MoE layer indices in registration (= prefetch) order."""
        return tuple(self._layers)

    @property
    def expert_view(self) -> str:
        """``multi`` or ``composite`` (``composite_weights`` exists with the latter)."""
        return self.config.expert_view

    @property
    def resident_experts(self) -> int:
        """Own experts per layer this rank keeps in its device memory: ``W - H``."""
        return self.tier_layout.resident_experts

    @property
    def view_offsets(self) -> tuple[int, ...]:
        """Global id of the first expert of each tensor of ``weights(i)`` (``layout.tensor_offsets``
        unless host experts split the own slice in two)."""
        return self.tier_layout.view_offsets

    @property
    def restores_experts(self) -> bool:
        """This rank rejoins a running group: load expert slices with ``restore_layer``."""
        return self._rejoin is not None and not self._exchange_started

    @property
    def peers_down(self) -> tuple[int, ...]:
        """Peers whose experts come from the host store now (dead, or not rejoined yet)."""
        return tuple(sorted(self._sources.down)) if self._sources is not None else ()

    @property
    def host_store_bytes(self) -> int:
        """Bytes of the node's host store (0 without host tiers or before exchange)."""
        return self._host.store.layout.total_bytes if self._host is not None else 0

    @property
    def buffer_bytes(self) -> int:
        """Bytes held beyond the registered tensors: the prefetch buffers (multi), or the pools
        plus the own allocations' edges and page rounding (composite); 0 before exchange or with
        one rank."""
        if self._composite is not None:
            return self._composite.buffer_bytes
        return self._buffers.total_bytes if self._buffers is not None else 0

    @property
    def mapped_allocations(self) -> int:
        """Distinct peer allocations mapped now (each opened once however many tensors it holds)."""
        return self._transport.open_allocations

    @property
    def stats(self) -> DwdpStats:
        """Snapshot of copy / stall counters (GPU timings of completed work only)."""
        if self._stats is None:
            return StatsRecorder(self._layers).snapshot()
        if self._engine is not None:
            self._engine.harvest()
        self._stats.peers_down = len(self.peers_down)
        return self._stats.snapshot()

    # ------------------------------------------------------------------ set-up
    def allocate(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A zeroed tensor on this rank's device in memory peers can map (shm on CPU)."""
        self._check_open("allocate")
        if self._composite_mode:
            r = self._composite_range(shape, dtype)
            if r is not None:
                return self._transport.allocate_at(shape, dtype, r.data_offset,
                                                   r.allocation_bytes)
        return self._transport.allocate(shape, dtype)

    def register_layer(self, layer_idx: int, tensors: Mapping[str, torch.Tensor],
                       host_tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Register one MoE layer's expert tensors (any names; dim 0 == ``resident_experts``,
        i.e. num_experts_per_worker unless host experts are configured).

        Tensors must be contiguous and on this rank's device; on CPU they must come from
        ``allocate``. With ``host_experts_per_worker`` H > 0, ``host_tensors`` holds the last H
        experts of the slice (same names, any device): they go to the node's host store at the
        exchange and are not kept. Raises DwdpRegistrationError naming the layer and tensor.
        """
        self._check_open("register_layer")
        if self._exchange_started:
            raise DwdpStateError(f"register_layer({layer_idx}) after exchange(): register first")
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise DwdpRegistrationError(f"layer_idx must be a non-negative int, got {layer_idx!r}")
        if layer_idx in self._pos_of:
            raise DwdpRegistrationError(f"layer {layer_idx} is already registered")
        if not tensors:
            raise DwdpRegistrationError(f"layer {layer_idx}: no tensors given")
        w = self.tier_layout.resident_experts
        own: dict[str, torch.Tensor] = {}
        handles: dict[str, HandleRecord] = {}
        for name, t in tensors.items():
            where = f"layer {layer_idx} tensor {name!r}"
            if not isinstance(name, str) or not name:
                raise DwdpRegistrationError(
                    f"layer {layer_idx}: tensor names must be non-empty str, got {name!r}")
            if not isinstance(t, torch.Tensor):
                raise DwdpRegistrationError(f"{where} is a {type(t).__name__}, not a torch.Tensor")
            if t.device != self.device:
                raise DwdpRegistrationError(f"{where} is on {t.device}, expected {self.device}")
            if t.dim() < 1 or t.shape[0] != w:
                raise DwdpRegistrationError(
                    f"{where} has shape {tuple(t.shape)}; dim 0 must be "
                    + (f"num_experts_per_worker = {w}" if not self.tier_layout.host_experts else
                       f"num_experts_per_worker - host_experts_per_worker = {w}")
                )
            if not t.is_contiguous():
                raise DwdpRegistrationError(
                    f"{where} is not contiguous (strides {t.stride()}); peers copy raw bytes"
                )
            if self._shared:
                try:
                    if self._composite_mode:
                        self._check_composite(t)
                    handles[name] = self._transport.export(t)
                except DwdpRegistrationError as exc:
                    raise DwdpRegistrationError(f"{where}: {exc}") from exc
            own[name] = t
        self._host_parts.append(self._check_host_part(layer_idx, own, host_tensors))
        self._pos_of[layer_idx] = len(self._layers)
        self._layers.append(layer_idx)
        self._own.append(own)
        self._handles.append(handles)

    def _check_composite(self, t: torch.Tensor) -> None:
        r = self._composite_range(tuple(t.shape), t.dtype)
        if r is None:
            raise DwdpRegistrationError("expert_view composite needs at least one byte per "
                                        "expert")
        mem, offset = self._transport.locate(t)
        if (offset, mem.size) != (r.data_offset, r.allocation_bytes):
            raise DwdpRegistrationError(
                f"its allocation ({mem.size} bytes, tensor at byte {offset}) is not the one "
                f"the composite view maps ({r.allocation_bytes} bytes, tensor at byte "
                f"{r.data_offset}): allocate it with DwdpManager.allocate(shape, dtype)")

    def _check_host_part(self, layer_idx: int, own: Mapping[str, torch.Tensor],
                         host: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        from tensorrt_llm_dwdp.dwdp.tiers import check_host_tensors

        try:
            return check_host_tensors(own, host, self.tier_layout.host_experts,
                                      rejoining=self._rejoin is not None)
        except ValueError as exc:
            raise DwdpRegistrationError(f"layer {layer_idx}: {exc}") from None

    def restore_layer(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """A rejoining rank's resident expert tensors of ``layer_idx``, allocated with
        ``allocate`` and filled from the node's host store (checksums verified): what the
        checkpoint loader uses instead of reading the checkpoint. Register them as usual."""
        if not self.restores_experts:
            raise DwdpStateError(f"restore_layer({layer_idx}): this rank is not rejoining a "
                                 f"running group (restores_experts is False)")
        specs = self._rejoin_specs()
        if layer_idx not in specs:
            raise DwdpRegistrationError(f"restore_layer({layer_idx}): the running group has no "
                                        f"MoE layer {layer_idx} (it has {sorted(specs)})")
        pos, shapes = specs[layer_idx]
        return self._rejoin_store().restore(pos, shapes, self.tier_layout.resident_range(),
                                            self.allocate, f"DWDP rank {self.rank} restoring "
                                            f"layer {layer_idx}")

    def exchange(self) -> None:
        """Swap handle records with the group, check agreement, map peers, build buffers.

        Collective: every rank of the group calls it once, after registering all layers.
        Disagreement (config, num_experts, layers, names, dtypes, shapes) raises
        DwdpMismatchError on every rank; a missing peer raises DwdpPeerError. With host tiers
        it also builds the node's host store (rank 0 creates it, every rank fills its part);
        a rejoining rank talks to its running group through the control block instead.
        """
        self._check_open("exchange")
        if self._exchange_started:
            raise DwdpStateError("exchange() called twice")
        if not self._layers:
            raise DwdpStateError("exchange() before any register_layer()")
        self._exchange_started = True
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # peers may read our weights from now on
        record = {
            "config": self.config.to_dict(),
            "num_experts": self.num_experts,
            "transport": self._transport.kind,
            "layers": [
                (layer, {n: (str(t.dtype), tuple(t.shape)) for n, t in own.items()})
                for layer, own in zip(self._layers, self._own)
            ],
            "handles": self._handles,
        }
        self._record = record
        if self._rejoin is not None:
            self._rejoin_group(record)
            return
        tiers = self.config.tiers_enabled
        if tiers and self.rank == 0:
            record["tiers"] = self._create_host()
            if self.config.dwdp_size == 1 and "error" in record["tiers"]:
                raise DwdpError(f"could not create the host store: {record['tiers']['error']}")
        if self.config.dwdp_size == 1:
            sources: list[dict[int, dict[str, int]]] = [{} for _ in self._own]
        else:
            records = self._allgather(_EXCHANGE, record)
            failed = [(r, rec["error"]) for r, rec in enumerate(records) if "error" in rec]
            if failed:  # those ranks are alive and wait in close(): no _peer_failed here
                raise DwdpPeerError("; ".join(
                    f"rank {r} failed before the handle exchange: {msg}" for r, msg in failed))
            problems = record_problems(records)
            if problems:
                raise DwdpMismatchError(summarize(problems, "DWDP ranks disagree"))
            sources, error = self._open_peers(records)
            if tiers and self.rank != 0 and not error:
                error = self._open_host(records[0]["tiers"])
            statuses = self._allgather(_OPEN, error)
            bad = [f"rank {r}: {msg}" for r, msg in enumerate(statuses) if msg]
            if bad:
                raise DwdpPeerError("mapping peer memory failed on " + "; ".join(bad))
            if not tiers:  # with host tiers a restarted peer maps them later: linked till close
                self._transport.after_exchange()
        if tiers:
            error = self._host.fill_all(self._own, self._host_parts, self.tier_layout)
            self._host_parts = [None] * len(self._own)  # they live in the store now
            statuses = self._allgather(_FILL, error) if self.config.dwdp_size > 1 else [error]
            bad = [f"rank {r}: {msg}" for r, msg in enumerate(statuses) if msg]
            if bad:
                raise DwdpPeerError("filling the host store failed on " + "; ".join(bad))
            self._host.claim(1, record)
        self._build(sources)
        logger.info("DWDP %s: %d layer(s), owns experts [%d, %d), buffers %.1f MiB%s",
                    self.comm.describe(), len(self._layers), *self.layout.owned_range(),
                    self.buffer_bytes / 2**20,
                    f", host store {self.host_store_bytes / 2**20:.1f} MiB" if tiers else "")

    # ------------------------------------------------------------------ host tiers: start-up
    def _create_host(self) -> dict:
        """Rank 0: the group's key, control block and store; ``{"key", "host"}`` or ``{"error"}``
        (carried in its exchange record, so a failure fails every rank together)."""
        from tensorrt_llm_dwdp.dwdp.host_tiers import HostTiers

        self._host, info = HostTiers.start(self.config, self.layout, self._own, self.device,
                                           group_id=self.comm.group_id)
        return info

    def _open_host(self, info: dict) -> str:
        from tensorrt_llm_dwdp.dwdp.host_tiers import HostTiers, check_same_host

        if "error" in info:
            raise DwdpPeerError(f"rank 0 could not create the host store: {info['error']}")
        message = check_same_host(list(getattr(self.comm, "hosts", None) or []))
        if message:
            raise DwdpMismatchError(message)
        self._host, info = HostTiers.start(self.config, self.layout, self._own, self.device,
                                           key=info["key"])
        return info.get("error", "")

    def _rejoin_specs(self) -> dict[int, tuple[int, dict]]:
        """``{layer: (position, {name: (dtype, shape)})}`` of the running group."""
        record = next(iter(self._rejoin.records.values()))
        return {layer: (pos, tensors) for pos, (layer, tensors) in enumerate(record["layers"])}

    def _rejoin_store(self):
        from tensorrt_llm_dwdp.dwdp.host_tiers import HostTiers

        if self._host is None:
            self._host = HostTiers.rejoin(self.config, self.layout, self._rejoin, self.device)
        return self._host

    def _rejoin_group(self, record: dict) -> None:
        """Exchange through the control block: map the serving peers, claim the next
        incarnation of this rank's slot; they take this rank back at their next step."""
        running = self._rejoin
        mine = {k: v for k, v in record.items() if k != "handles"}
        theirs = {r: {k: v for k, v in rec.items() if k != "handles"}
                  for r, rec in running.records.items()}
        problems = record_problems([mine, *theirs.values()])
        if problems:
            raise DwdpMismatchError(summarize(problems, "this rank disagrees with its running group"
                                              " (record 0 is this rank's)"))
        host = self._rejoin_store()
        records: list[dict] = [{} for _ in range(self.config.dwdp_size)]
        for r, rec in running.records.items():
            records[r] = rec
        live = [p for p in self.layout.peers if p in running.records]
        sources, error = self._open_peers(records, live)
        if error:
            raise DwdpPeerError(f"rejoining rank {self.rank} could not map its peers: {error}")
        control = host.control
        incarnation = control.incarnation(self.rank) + 1
        host.claim(incarnation, record)
        for p in live:
            control.ack(self.rank, p, control.incarnation(p))
        self._build(sources, down=[p for p in self.layout.peers if p not in live],
                    seen={p: control.incarnation(p) for p in live})
        message = (f"DWDP rank {self.rank} rejoined group {running.key} (incarnation "
                   f"{incarnation}): experts restored from the host store; peers {live} over "
                   f"their memory" + (f", {sorted(self._sources.down)} from the host store"
                                      if self._sources.down else ""))
        logger.warning(message)
        self.tier_events.append(TierEvent("rejoined", self.rank, 0.0, message))

    def _open_peers(self, records: list[dict], peers: Sequence[int] | None = None
                    ) -> tuple[list[dict[int, dict[str, int]]], str]:
        """Map every peer tensor; ``sources[pos][peer][name]``: address of its byte 0 (global
        expert ``P * peer``)."""
        sources: list[dict[int, dict[str, int]]] = []
        try:
            for pos, own in enumerate(self._own):
                sources.append({peer: {name: self._transport.open(
                    peer, records[peer]["handles"][pos][name]) for name in own}
                    for peer in (self.layout.peers if peers is None else peers)})
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            logger.error("DWDP rank %d could not map peer memory: %s", self.rank, message)
            return sources, message
        self._peer_handles = {peer: records[peer]["handles"]
                              for peer in (self.layout.peers if peers is None else peers)}
        return sources, ""

    def _build(self, sources: list[dict[int, dict[str, int]]], down: Sequence[int] = (),
               seen: Mapping[int, int] | None = None) -> None:
        self._n = len(self._layers)
        self._stats = StatsRecorder(self._layers)
        host_experts = self.tier_layout.host_experts
        if not self._shared:
            self._views = [[{n: [t] for n, t in own.items()}] * NUM_BUFFERS for own in self._own]
            self._composite_views = [[dict(own)] * NUM_BUFFERS for own in self._own]
            return
        expert_bytes = [{name: t[0].numel() * t.element_size() for name, t in own.items()}
                        for own in self._own]
        uvm_tensors = None
        if host_experts and self.config.host_offload == "uvm":
            from tensorrt_llm_dwdp.dwdp.uvm import ManagedExperts

            self._uvm = ManagedExperts(self.device, self._host.store, self._own, host_experts,
                                       self.tier_layout.host_range()[0])
            uvm_tensors = self._uvm.tensors
        self._sources = SourceTable(self.config, self.tier_layout, expert_bytes, sources,
                                    self._peer_handles, self._host,
                                    own_host_copied=uvm_tensors is None)
        self._sources.down.update(down)
        self._sources.seen.update(seen if seen is not None else
                                  {p: 1 for p in self.layout.peers})
        if self._host is not None:  # what this rank reads from host memory from the start
            self._host.verify_sources(self._sources.ranges(), f"DWDP rank {self.rank} start-up")
            self._watch = PeerWatch(self.rank, self._host, self._sources, self._transport,
                                    self._stats, self._record, self.tier_events)
        if self._composite_mode:
            self._build_composite()
        else:
            self._buffers = PrefetchBuffers(self.layout, self._own, self.device, host_experts,
                                            uvm_tensors)
            self._views = [[self._buffers.view(pos, b) for b in range(NUM_BUFFERS)]
                           for pos in range(self._n)]
        self._rebuild_plans()
        if self.device.type == "cuda":
            from tensorrt_llm_dwdp.dwdp.copy_engine import CudaCopyEngine

            self._engine = CudaCopyEngine(self.device, self._stats, self.config.contention_opt)
        else:
            from tensorrt_llm_dwdp.dwdp.copy_engine import ThreadCopyEngine

            self._engine = ThreadCopyEngine(self._stats, name=f"dwdp-copy-r{self.rank}")

    def _build_composite(self) -> None:
        from tensorrt_llm_dwdp.dwdp.composite_views import CompositeViews

        self._composite = CompositeViews(self._transport.vmm, self.tier_layout, self._own,
                                         self._transport.locate, self.page_bytes)
        edges = self._composite.copy_edges(
            [c for pos in range(self._n)
             for link in self._sources.copies(pos, self._composite.edge_place(pos)) for c in link])
        logger.debug("DWDP rank %d: %d edge byte(s) filled from peers", self.rank, edges)
        self._views = [[self._composite.multi_view(pos, b) for b in range(NUM_BUFFERS)]
                       for pos in range(self._n)]
        self._composite_views = [[self._composite.view(pos, b) for b in range(NUM_BUFFERS)]
                                 for pos in range(self._n)]

    def _rebuild_plans(self) -> None:
        if self._composite is not None:
            place = self._composite.place
        else:
            def place(pos: int, b: int) -> Place:
                return slot_place(lambda slot, name: self._buffers.dst(pos, b, slot, name)[0])
        self._plans, self._host_bytes = self._sources.plans(NUM_BUFFERS, place)

    # ------------------------------------------------------------------ per step
    def start_step(self) -> None:
        """Make sure the first two MoE layers of this step are (being) prefetched."""
        if self._views is None:
            self._state_error("start_step")
        if self._current % self._n != 0:
            raise DwdpStateError(
                f"start_step() while layer {self._layers[self._current % self._n]} of the current "
                f"step has not run done(); finish the step or call abort_step()"
            )
        if self._watch is not None:
            self._watch_peers("start_step")
        while self._queued < self._current + NUM_BUFFERS:
            self._queue(self._queued)

    def end_step(self) -> None:
        """Close a step whose last ``done()`` has run: raise ``DwdpStepRetry`` if a peer this
        step read from went down meanwhile (its ranges have moved to the host store; run the
        step again, its outputs may hold bytes of a dying process). Without host tiers, or with
        no peer to read, it returns at once. GPU: waits for the step's compute first, so the
        check follows every copy the step used.
        """
        if self._views is None:
            self._state_error("end_step")
        if self._current % self._n != 0:
            raise DwdpStateError(
                f"end_step() before layer {self._layers[self._current % self._n]} of the step ran "
                f"done(); call it after the step's last MoE layer")
        if self._watch is None or not self._sources.up_peers:
            return
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        if self._watch_peers("end_step"):
            self._stats.step_retries += 1
            raise DwdpStepRetry(f"DWDP rank {self.rank}: peer(s) {list(self.peers_down)} went "
                                f"down during the step; run it again")

    def weights(self, layer_idx: int) -> dict[str, list[torch.Tensor]]:
        """``{name: [S tensors by rank]}`` of layer ``layer_idx``; read-only, reused every step.

        GPU: the current stream waits for this layer's prefetch (no host sync). CPU: blocks
        until the copy thread has filled the buffer.
        """
        pos, b = self._acquire("weights", layer_idx)
        return self._views[pos][b]

    def composite_weights(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """``{name: tensor [E, ...]}`` of layer ``layer_idx`` (expert e at byte ``e *
        expert_bytes``); waits like ``weights``. Needs ``expert_view: composite`` (or one
        rank without offload, where it is the rank's own tensors)."""
        if self._shared and not self._composite_mode:
            raise DwdpStateError(
                f"composite_weights({layer_idx}) with dwdp_config.expert_view = "
                f"{self.config.expert_view!r}: set expert_view: composite (run --expert-view "
                "composite)")
        pos, b = self._acquire("composite_weights", layer_idx)
        return self._composite_views[pos][b]

    def _acquire(self, what: str, layer_idx: int) -> tuple[int, int]:
        seq = self._current
        pos = self._pos_of.get(layer_idx)
        if pos is None or seq >= self._queued or pos != seq % self._n:
            self._state_error(what, layer_idx)
        if self._engine is not None:
            self._engine.wait(seq & 1, pos)
        return pos, seq & 1

    def done(self, layer_idx: int) -> None:
        """Layer ``layer_idx``'s compute is issued; its buffer refills with the layer two ahead."""
        seq = self._current
        pos = self._pos_of.get(layer_idx)
        if pos is None or seq >= self._queued or pos != seq % self._n:
            self._state_error("done", layer_idx)
        if self._engine is not None:
            self._engine.compute_done(seq & 1)
        self._current = seq + 1
        while self._queued <= seq + NUM_BUFFERS:
            self._queue(self._queued)

    def abort_step(self) -> None:
        """Abandon the rest of a step (e.g. its forward raised); the next start_step is clean."""
        if self._views is None:
            self._state_error("abort_step")
        if self._engine is not None:
            for b in range(NUM_BUFFERS):
                self._engine.compute_done(b)
        boundary = -(-self._current // self._n) * self._n
        self._current = boundary
        self._queued = max(self._queued, boundary)

    def _queue(self, seq: int) -> None:
        pos = seq % self._n
        if self._engine is not None:
            self._engine.submit(seq & 1, self._plans[pos][seq & 1], pos)
            self._stats.host_bytes += self._host_bytes[pos][seq & 1]
        self._queued = seq + 1

    def _watch_peers(self, at: str) -> bool:
        """Fail over dead peers, take rejoined ones back (``failover.PeerWatch``); True if a
        peer this rank read died (the step's outputs are suspect)."""
        switched, died = self._watch.check(at, self._engine.synchronize)
        if switched:
            self._rebuild_plans()
        if died:
            self._queued = self._current  # re-queue what may have read it (a step boundary)
        return died

    def copy_plans(self) -> list[CopyPlan]:
        """Every (layer, buffer) plan the copy engine runs now (benchmarks time raw copies of
        the same bytes beside them)."""
        return [plan for row in self._plans for plan in row]

    def peer_down(self, peer: int) -> str | None:
        """Why ``peer`` is down now (process gone, heartbeat silent, closed), or None; needs
        host tiers (their control block tracks the group's processes)."""
        if self._host is None:
            raise DwdpStateError("peer_down() needs host tiers (host_backup or "
                                 "host_experts_per_worker) and a finished exchange()")
        return self._host.dead_peers([peer]).get(peer)

    def poison_buffers(self, byte: int = 0xA5) -> None:
        """Fill every prefetch buffer with ``byte`` so a missed copy shows (tests, debugging)."""
        target = self._composite if self._composite is not None else self._buffers
        if target is None:
            return
        if self._engine is not None:
            self._engine.synchronize()
        target.fill_(byte)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def synchronize(self) -> None:
        """Wait for every queued prefetch to land (host-side)."""
        if self._engine is not None:
            self._engine.synchronize()

    # ------------------------------------------------------------------ errors
    def _check_open(self, what: str) -> None:
        if self._closed:
            raise DwdpStateError(f"{what}() on a closed DwdpManager")

    def _state_error(self, what: str, layer_idx: int | None = None) -> None:
        self._check_open(what)
        call = f"{what}({'' if layer_idx is None else layer_idx})"
        if self._views is None:
            raise DwdpStateError(f"{call} before exchange()")
        if layer_idx is not None and layer_idx not in self._pos_of:
            raise DwdpStateError(f"{call}: layer {layer_idx} is not registered "
                                 f"(registered: {self._layers})")
        if self._current >= self._queued:
            raise DwdpStateError(f"{call} before start_step()")
        expected = self._layers[self._current % self._n]
        raise DwdpStateError(
            f"{call} out of order: layer {expected} is next; MoE layers must call weights(i) "
            f"then done(i) in registration order {self._layers}"
        )

    def _allgather(self, what: str, obj: Any) -> list[Any]:
        try:
            tagged = self.comm.allgather((what, obj), self.config.peer_timeout_s, what)
        except DwdpPeerError:
            self._peer_failed = True
            raise
        # A peer whose manager never got built closes its bare comm: a raw barrier (None).
        labels = [item[0] if isinstance(item, tuple) and len(item) == 2 else None
                  for item in tagged]
        stray = [(r, label) for r, label in enumerate(labels) if label != what]
        if stray:
            self._peer_failed = True
            raise DwdpPeerError(f"{what}: " + ", ".join(
                f"rank {r} is at {label!r}" if label is not None
                else f"rank {r} left the group without a DWDP manager" for r, label in stray)
                + " (the group is out of step)")
        return [payload for _, payload in tagged]

    # ------------------------------------------------------------------ shutdown
    def close(self, reason: str = "") -> None:
        """Stop prefetching, unmap peers, leave the group, release shared memory (idempotent).

        Before the exchange, peers waiting in it are told this rank is gone (with ``reason``).
        After it, a barrier makes sure no peer still reads this rank's memory; a peer that does
        not arrive within peer_timeout_s raises DwdpPeerError (after all local cleanup). With
        host tiers the barrier runs through the control block and waits only for peers that
        are up (a dead peer cannot read anything), and the last ranks out unlink the group's
        host store and control block.
        """
        if self._closed:
            return
        self._closed = True
        error: BaseException | None = None
        try:
            if self._engine is not None:
                self._engine.close()
        except Exception as exc:
            error = exc
        self._views = self._composite_views = None
        try:
            if self._uvm is not None:
                self._uvm.close()
            if self._composite is not None:
                self._composite.close()
        except Exception as exc:
            error = error or exc
        try:
            self._transport.close_peers()
        except Exception as exc:
            error = error or exc
        claimed = self._host is not None and self._host.claimed
        if claimed:  # the control block replaces the comm's barrier (whose peers may be dead)
            laggards = self._host.close(self.config.peer_timeout_s)
            if laggards:
                error = error or DwdpPeerError(
                    f"DWDP close (rank {self.rank}): rank(s) {laggards} neither closed nor went "
                    f"down within peer_timeout_s = {self.config.peer_timeout_s:g} s")
        elif self.config.dwdp_size > 1 and not self._peer_failed:
            try:
                if not self._exchange_started:
                    self._allgather(_EXCHANGE, {"error": reason or "closed before exchange()"})
                self._allgather(_CLOSE, None)
            except DwdpPeerError as exc:
                error = error or exc
        if self._host is not None and not claimed:  # start-up failed: nobody uses the files
            self._host.close(0.0)
        try:
            self._transport.close()
        except Exception as exc:
            error = error or exc
        self._buffers, self._engine, self._plans, self._composite = None, None, [], None
        self._current = self._queued = 0  # weights()/done() now take the error path
        try:
            if self._peer_failed or claimed:  # after the control block's barrier nobody
                self.comm.abandon()               # needs the comm any more
            else:
                self.comm.close()
        except Exception as exc:
            error = error or exc
        if error is not None:
            raise error

    def __enter__(self) -> "DwdpManager":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close(reason=f"{exc_type.__name__}: {exc}")
        except Exception as close_exc:  # do not mask the error that is already propagating
            logger.error("DWDP close after %s also failed: %s", exc_type.__name__, close_exc)
