"""DwdpManager: one rank's share of a DWDP group -- registration, joining the group, the prefetch
runtime and the per-step protocol, behind one small API.

```
mgr = DwdpManager(config, num_experts, comm, device)    # or DwdpManager.from_environment(...)
t = mgr.allocate(shape, dtype)                            # memory peers can map
mgr.register_layer(layer_idx, {"w3_w1_weight": t, ...})   # dim 0 == W for every tensor
                                                          # (weight_layout= their byte order)
mgr.exchange()                                            # one allgather + agreement checks
each step:  mgr.start_step()
            view = mgr.composite_weights(i)   # {name: [E, ...]}; compute waits i's prefetch
            ... compute layer i ...           # (or mgr.weights(i): {name: [S tensors by rank]})
            mgr.done(i)             # buffer of i refills with the layer two ahead
            mgr.end_step()          # host tiers: DwdpStepRetry if a peer died under the step
mgr.close()                                               # or `with mgr:`
```
The parts, one module each: joining the group (``exchange.py``: handle records, agreement,
mapping peers, the host store, rejoining a running group), what the exchange builds
(``runtime.py``: views, sources, failover watch, copy plans and engine) and the per-step
protocol (``steps.py``: which layer is next, which buffer each prefetch lands in). The manager
owns the comm it is given.

Two views of a layer (``config.expert_view``): ``composite`` (the default) maps the own slice
and the prefetched experts into one ``[E, ...]`` range per tensor (``composite_views``), handed
out by ``composite_weights(i)``; ``weights(i)`` then returns slices of it, so multi-tensor
callers keep working. Its memory must come from ``allocate`` (virtual-memory allocations shared
by handle, ``transport.vmm``). ``multi`` keeps the own slice and one buffer per peer as
separate tensors.

Host tiers (``config.tiers_enabled``, ``tiers.py``): the exchange also builds the node's host
store and control block (``host_tiers.py``); each step checks the peers it reads
(``start_step`` and ``end_step``), moves a dead peer's ranges to the host store (failover:
``end_step`` then raises ``DwdpStepRetry`` and the engine runs the step again), takes a
restarted peer back (rejoin), and with ``host_experts_per_worker`` prefetches part of the rank's
own slice from host memory too (composite: onto pool pages after the resident own experts;
multi: the view then has S + 1 tensors, ``view_offsets``; UVM read-through: multi only). Both
views are filled by the same per-peer copies, so a peer's source switches tiers by switching the
address its copies read.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch

from tensorrt_llm_dwdp.comm import GroupComm, connect
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig, DwdpConfigError
from tensorrt_llm_dwdp.dwdp.copy_plan import CopyPlan
from tensorrt_llm_dwdp.dwdp.errors import (DwdpMismatchError, DwdpPeerError,
                                           DwdpRegistrationError, DwdpStateError, DwdpStepRetry)
from tensorrt_llm_dwdp.dwdp.exchange import EXCHANGE, GroupExchange, Joined
from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout
from tensorrt_llm_dwdp.dwdp.registration import ExpertMemory, check_tensor
from tensorrt_llm_dwdp.dwdp.runtime import PrefetchRuntime
from tensorrt_llm_dwdp.dwdp.sources import TierEvent
from tensorrt_llm_dwdp.dwdp.stats import DwdpStats, StatsRecorder
from tensorrt_llm_dwdp.dwdp.steps import StepSequencer
from tensorrt_llm_dwdp.dwdp.tiers import TierLayout
from tensorrt_llm_dwdp.transport import HandleRecord, Transport

logger = logging.getLogger(__name__)

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
        self._memory = ExpertMemory(config, self.tier_layout, self.device, self._composite_mode,
                                    transport)
        self.page_bytes = self._memory.page_bytes   # composite mapping unit (0 under multi)
        self._transport = self._memory.transport
        self._layers: list[int] = []
        self._own: list[dict[str, torch.Tensor]] = []
        self._handles: list[dict[str, HandleRecord]] = []
        self._weight_layout: str | None = None  # of the registered layers (one for all)
        self._host_parts: list[dict[str, torch.Tensor] | None] = []
        self._rejoin = rejoin         # host_tiers.RunningGroup when restarting into a live group
        self._joining = GroupExchange(config, self.tier_layout, comm, self._transport,
                                      self.device, self._allgather, rejoin)
        self._runtime: PrefetchRuntime | None = None   # built by exchange()
        self._stats: StatsRecorder | None = None
        self._exchange_started = False
        self._peer_failed = False
        self._closed = False
        self.tier_events: list[TierEvent] = []

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
    def weight_layout(self) -> str:
        """The byte order of the registered expert weights (``moe/layouts.py``; ``linear``
        before any registration); the group's ranks agree on it at the exchange."""
        return self._weight_layout or "linear"

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
        return self._runtime.peers_down if self._runtime is not None else ()

    @property
    def host_store_bytes(self) -> int:
        """Bytes of the node's host store (0 without host tiers or before exchange)."""
        return self._host.store.layout.total_bytes if self._host is not None else 0

    @property
    def buffer_bytes(self) -> int:
        """Bytes held beyond the registered tensors: the prefetch buffers (multi), or the pools
        plus the own allocations' edges and page rounding (composite); 0 before exchange or with
        one rank."""
        return self._runtime.buffer_bytes if self._runtime is not None else 0

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

    @property
    def _host(self) -> Any:
        """This rank's ``host_tiers.HostTiers`` (host tiers on, once created or opened)."""
        return self._joining.host

    @property
    def _composite(self) -> Any:
        """The ``composite_views.CompositeViews`` of a composite-view rank after the exchange."""
        return self._runtime.composite if self._runtime is not None else None

    @property
    def managed_experts(self) -> Any:
        """The ``uvm.ManagedExperts`` of ``host_offload: uvm`` after the exchange, else None."""
        return self._runtime.uvm if self._runtime is not None else None

    @property
    def _engine(self) -> Any:
        """The copy engine (None before the exchange, after close, or with nothing to copy)."""
        return self._runtime.engine if self._runtime is not None else None

    # ------------------------------------------------------------------ set-up
    def allocate(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A zeroed tensor on this rank's device in memory peers can map (shm on CPU)."""
        self._check_open("allocate")
        return self._memory.allocate(shape, dtype)

    def register_layer(self, layer_idx: int, tensors: Mapping[str, torch.Tensor],
                       host_tensors: Mapping[str, torch.Tensor] | None = None, *,
                       weight_layout: str = "linear") -> None:
        """Register one MoE layer's expert tensors (any names; dim 0 == ``resident_experts``,
        i.e. num_experts_per_worker unless host experts are configured).

        Tensors must be contiguous and on this rank's device; on CPU they must come from
        ``allocate``. With ``host_experts_per_worker`` H > 0, ``host_tensors`` holds the last H
        experts of the slice (same names, any device): they go to the node's host store at the
        exchange and are not kept. ``weight_layout``: the byte order of the weights within each
        expert (``moe/layouts.py``), the same for every layer of a rank and, checked at the
        exchange, for every rank of the group (whole experts are copied as they are, so a peer
        in another layout would hand this rank bytes its kernel misreads). Raises
        DwdpRegistrationError naming the layer and tensor.
        """
        self._check_open("register_layer")
        if self._exchange_started:
            raise DwdpStateError(f"register_layer({layer_idx}) after exchange(): register first")
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise DwdpRegistrationError(f"layer_idx must be a non-negative int, got {layer_idx!r}")
        if layer_idx in self._layers:
            raise DwdpRegistrationError(f"layer {layer_idx} is already registered")
        if not tensors:
            raise DwdpRegistrationError(f"layer {layer_idx}: no tensors given")
        self._check_weight_layout(layer_idx, weight_layout)
        own: dict[str, torch.Tensor] = {}
        handles: dict[str, HandleRecord] = {}
        for name, t in tensors.items():
            where = check_tensor(layer_idx, name, t, self.device, self.tier_layout)
            if self._shared:
                try:
                    handles[name] = self._memory.export(t)
                except DwdpRegistrationError as exc:
                    raise DwdpRegistrationError(f"{where}: {exc}") from exc
            own[name] = t
        self._host_parts.append(self._check_host_part(layer_idx, own, host_tensors))
        self._layers.append(layer_idx)
        self._own.append(own)
        self._handles.append(handles)
        self._weight_layout = weight_layout

    def _check_weight_layout(self, layer_idx: int, weight_layout: str) -> None:
        from tensorrt_llm_dwdp.moe.layouts import WEIGHT_LAYOUTS

        if weight_layout not in WEIGHT_LAYOUTS:
            raise DwdpRegistrationError(f"layer {layer_idx}: unknown weight_layout "
                                        f"{weight_layout!r}; choose one of {WEIGHT_LAYOUTS}")
        if self._weight_layout not in (None, weight_layout):
            raise DwdpRegistrationError(
                f"layer {layer_idx}: weight_layout {weight_layout!r} but layer "
                f"{self._layers[0]} was registered {self._weight_layout!r} (one layout per rank)")

    def _check_host_part(self, layer_idx: int, own: Mapping[str, torch.Tensor],
                         host: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        from tensorrt_llm_dwdp.dwdp.tiers import check_host_tensors

        try:
            return check_host_tensors(own, host, self.tier_layout.host_experts,
                                      rejoining=self._rejoin is not None)
        except ValueError as exc:
            raise DwdpRegistrationError(f"layer {layer_idx}: {exc}") from None

    def restore_layer(self, layer_idx: int, *,
                      weight_layout: str | None = None) -> dict[str, torch.Tensor]:
        """A rejoining rank's resident expert tensors of ``layer_idx``, allocated with
        ``allocate`` and filled from the node's host store (checksums verified): what the
        checkpoint loader uses instead of reading the checkpoint. Register them as usual.
        ``weight_layout``: the layout this rank will register; the store holds the running
        group's, so another one raises DwdpMismatchError before anything is allocated (the
        exchange would refuse it only after every layer was restored)."""
        if not self.restores_experts:
            raise DwdpStateError(f"restore_layer({layer_idx}): this rank is not rejoining a "
                                 f"running group (restores_experts is False)")
        theirs = next(iter(self._rejoin.records.values())).get("weight_layout", "linear")
        if weight_layout is not None and weight_layout != theirs:
            raise DwdpMismatchError(
                f"DWDP rank {self.rank} restoring layer {layer_idx}: this rank keeps "
                f"{weight_layout!r} expert weights but its running group's (and the host "
                f"store's) are {theirs!r}; restart it with the group's MoE backend and weight "
                f"layout")
        specs = self._joining.running_specs()
        if layer_idx not in specs:
            raise DwdpRegistrationError(f"restore_layer({layer_idx}): the running group has no "
                                        f"MoE layer {layer_idx} (it has {sorted(specs)})")
        pos, shapes = specs[layer_idx]
        return self._joining.rejoin_store().restore(
            pos, shapes, self.tier_layout.resident_range(), self.allocate,
            f"DWDP rank {self.rank} restoring layer {layer_idx}")

    def exchange(self) -> None:
        """Swap handle records with the group, check agreement, map peers, build buffers.

        Collective: every rank of the group calls it once, after registering all layers.
        Disagreement (config, num_experts, weight layout, layers, names, dtypes, shapes) raises
        DwdpMismatchError on every rank; a missing peer raises DwdpPeerError. With host tiers
        it also builds the node's host store (rank 0 creates it, every rank fills its part);
        a rejoining rank talks to its running group through the control block instead
        (``exchange.GroupExchange``).
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
            "weight_layout": self.weight_layout,
            "layers": [
                (layer, {n: (str(t.dtype), tuple(t.shape)) for n, t in own.items()})
                for layer, own in zip(self._layers, self._own)
            ],
            "handles": self._handles,
        }
        if self._rejoin is not None:
            joined = self._joining.rejoin(record, self._own)
            self._build(joined, record)
            logger.warning(joined.message)
            self.tier_events.append(TierEvent("rejoined", self.rank, 0.0, joined.message))
            return
        try:
            joined = self._joining.run(record, self._own, self._host_parts)
        finally:
            self._host_parts = [None] * len(self._own)  # the host store holds them now
        self._build(joined, record)
        logger.info("DWDP %s: %d layer(s), owns experts [%d, %d), buffers %.1f MiB%s",
                    self.comm.describe(), len(self._layers), *self.layout.owned_range(),
                    self.buffer_bytes / 2**20, f", host store {self.host_store_bytes / 2**20:.1f}"
                    " MiB" if self.config.tiers_enabled else "")

    def _build(self, joined: Joined, record: dict) -> None:
        """The prefetch runtime over what joining mapped (``runtime.PrefetchRuntime``)."""
        self._stats = StatsRecorder(self._layers)
        self._runtime = PrefetchRuntime(
            self.config, self.tier_layout, self._layers, self._own, self.device,
            self._transport, shared=self._shared, composite=self._composite_mode,
            page_bytes=self.page_bytes, bases=joined.bases, handles=self._joining.peer_handles,
            host=self._host, record=record, events=self.tier_events, stats=self._stats,
            down=joined.down, seen=joined.seen)

    # ------------------------------------------------------------------ per step
    def start_step(self) -> None:
        """Make sure the first two MoE layers of this step are (being) prefetched."""
        steps = self._steps("start_step")
        layer = steps.mid_step_layer()
        if layer is not None:
            raise DwdpStateError(
                f"start_step() while layer {layer} of the current step has not run done(); "
                f"finish the step or call abort_step()")
        if self._runtime.watch is not None:
            self._runtime.watch_peers("start_step")
        steps.fill()

    def end_step(self) -> None:
        """Close a step whose last ``done()`` has run: raise ``DwdpStepRetry`` if a peer this
        step read from went down meanwhile (its ranges have moved to the host store; run the
        step again, its outputs may hold bytes of a dying process). Without host tiers, or with
        no peer to read, it returns at once. GPU: waits for the step's compute first, so the
        check follows every copy the step used.
        """
        layer = self._steps("end_step").mid_step_layer()
        if layer is not None:
            raise DwdpStateError(f"end_step() before layer {layer} of the step ran done(); call "
                                 f"it after the step's last MoE layer")
        runtime = self._runtime
        if runtime.watch is None or not runtime.sources.up_peers:
            return
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        if runtime.watch_peers("end_step"):
            self._stats.step_retries += 1
            raise DwdpStepRetry(f"DWDP rank {self.rank}: peer(s) {list(self.peers_down)} went "
                                f"down during the step; run it again")

    def weights(self, layer_idx: int) -> dict[str, list[torch.Tensor]]:
        """``{name: [S tensors by rank]}`` of layer ``layer_idx``; read-only, reused every step.

        GPU: the current stream waits for this layer's prefetch (no host sync). CPU: blocks
        until the copy thread has filled the buffer.
        """
        pos, b = self._steps("weights", layer_idx).acquire("weights", layer_idx)
        return self._runtime.views[pos][b]

    def composite_weights(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """``{name: tensor [E, ...]}`` of layer ``layer_idx`` (expert e at byte ``e *
        expert_bytes``); waits like ``weights``. Needs ``expert_view: composite`` (or one
        rank without offload, where it is the rank's own tensors)."""
        if self._shared and not self._composite_mode:
            raise DwdpStateError(
                f"composite_weights({layer_idx}) with dwdp_config.expert_view = "
                f"{self.config.expert_view!r}: set expert_view: composite (run --expert-view "
                "composite)")
        steps = self._steps("composite_weights", layer_idx)
        pos, b = steps.acquire("composite_weights", layer_idx)
        return self._runtime.composite_views[pos][b]

    def done(self, layer_idx: int) -> None:
        """Layer ``layer_idx``'s compute is issued; its buffer refills with the layer two ahead."""
        self._steps("done", layer_idx).done(layer_idx)

    def abort_step(self) -> None:
        """Abandon the rest of a step (e.g. its forward raised); the next start_step is clean."""
        self._steps("abort_step").abort()

    def copy_plans(self) -> list[CopyPlan]:
        """Every (layer, buffer) plan the copy engine runs now (benchmarks time raw copies of
        the same bytes beside them)."""
        return self._runtime.copy_plans() if self._runtime is not None else []

    def peer_down(self, peer: int) -> str | None:
        """Why ``peer`` is down now (process gone, heartbeat silent, closed), or None; needs
        host tiers (their control block tracks the group's processes)."""
        if self._host is None:
            raise DwdpStateError("peer_down() needs host tiers (host_backup or "
                                 "host_experts_per_worker) and a finished exchange()")
        return self._host.dead_peers([peer]).get(peer)

    def poison_buffers(self, byte: int = 0xA5) -> None:
        """Fill every prefetch buffer with ``byte`` so a missed copy shows (tests, debugging)."""
        if self._runtime is not None:
            self._runtime.poison(byte)

    def synchronize(self) -> None:
        """Wait for every queued prefetch to land (host-side)."""
        if self._engine is not None:
            self._engine.synchronize()

    # ------------------------------------------------------------------ errors
    def _check_open(self, what: str) -> None:
        if self._closed:
            raise DwdpStateError(f"{what}() on a closed DwdpManager")

    def _steps(self, what: str, layer_idx: int | None = None) -> StepSequencer:
        """The step protocol, once the manager is open and exchanged (else DwdpStateError)."""
        self._check_open(what)
        if self._runtime is None:
            raise DwdpStateError(f"{what}({'' if layer_idx is None else layer_idx}) before "
                                 f"exchange()")
        return self._runtime.steps

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
            if self._runtime is not None:  # engine stopped, then managed memory and ranges
                self._runtime.close()
        except Exception as exc:
            error = exc
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
                    self._allgather(EXCHANGE, {"error": reason or "closed before exchange()"})
                self._allgather(_CLOSE, None)
            except DwdpPeerError as exc:
                error = error or exc
        if self._host is not None and not claimed:  # start-up failed: nobody uses the files
            self._host.close(0.0)
        try:
            self._transport.close()
        except Exception as exc:
            error = error or exc
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
