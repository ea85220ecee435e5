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
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch

from tensorrt_llm_dwdp.dwdp.agreement import record_problems, summarize
from tensorrt_llm_dwdp.comm import GroupComm, connect
from tensorrt_llm_dwdp.dwdp.composite_layout import CompositeRange, check_page_bytes
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig, DwdpConfigError
from tensorrt_llm_dwdp.dwdp.copy_plan import CopyPlan, interleaved_plan, peer_order, per_peer_plan
from tensorrt_llm_dwdp.dwdp.errors import (DwdpMismatchError, DwdpPeerError, DwdpRegistrationError,
                                      DwdpStateError)
from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout
from tensorrt_llm_dwdp.dwdp.prefetch_buffer import NUM_BUFFERS, PrefetchBuffers
from tensorrt_llm_dwdp.dwdp.stats import DwdpStats, StatsRecorder
from tensorrt_llm_dwdp.transport import HandleRecord, Transport, transport_for

logger = logging.getLogger(__name__)

_EXCHANGE = "DWDP handle exchange"
_OPEN = "DWDP peer mapping"
_CLOSE = "DWDP close"


class DwdpManager:
    """One rank's share of a DWDP group: its experts, its peers' mappings, its prefetches."""

    def __init__(self, config: DwdpConfig, num_experts: int, comm: GroupComm,
                 device: torch.device | str = "cpu", transport: Transport | None = None) -> None:
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
        self.rank = comm.rank
        self._composite_mode = config.expert_view == "composite" and config.dwdp_size > 1
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
        """The composite layout of a ``[W, ...]`` tensor (None for other shapes)."""
        if not shape or shape[0] != self.layout.num_experts_per_worker:
            return None
        nbytes = torch.empty(tuple(shape), dtype=dtype, device="meta").nbytes
        eb = nbytes // shape[0]
        return CompositeRange.of(self.layout, eb, self.page_bytes) if eb else None

    @classmethod
    def from_environment(cls, config: DwdpConfig, num_experts: int,
                         device: torch.device | str = "cpu") -> "DwdpManager":
        """Join the group this process was launched into (mpirun, or TRTLLM_DWDP_* for TCP)."""
        config.check_num_experts(num_experts)
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
    def buffer_bytes(self) -> int:
        """Bytes held by the prefetch buffers or pools (0 before exchange or with one rank)."""
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

    def register_layer(self, layer_idx: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Register one MoE layer's expert tensors (any names; dim 0 == num_experts_per_worker).

        Tensors must be contiguous and on this rank's device; on CPU they must come from
        ``allocate``. Raises DwdpRegistrationError naming the layer and tensor otherwise.
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
        w = self.layout.num_experts_per_worker
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
                    f"num_experts_per_worker = {w}"
                )
            if not t.is_contiguous():
                raise DwdpRegistrationError(
                    f"{where} is not contiguous (strides {t.stride()}); peers copy raw bytes"
                )
            if self.config.dwdp_size > 1:
                try:
                    if self._composite_mode:
                        self._check_composite(t)
                    handles[name] = self._transport.export(t)
                except DwdpRegistrationError as exc:
                    raise DwdpRegistrationError(f"{where}: {exc}") from exc
            own[name] = t
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

    def exchange(self) -> None:
        """Swap handle records with the group, check agreement, map peers, build buffers.

        Collective: every rank of the group calls it once, after registering all layers.
        Disagreement (config, num_experts, layers, names, dtypes, shapes) raises
        DwdpMismatchError on every rank; a missing peer raises DwdpPeerError.
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
        records = self._allgather(_EXCHANGE, record)
        failed = [(r, rec["error"]) for r, rec in enumerate(records) if "error" in rec]
        if failed:  # those ranks are alive and wait in close(): no _peer_failed here
            raise DwdpPeerError("; ".join(
                f"rank {r} failed before the handle exchange: {msg}" for r, msg in failed))
        problems = record_problems(records)
        if problems:
            raise DwdpMismatchError(summarize(problems, "DWDP ranks disagree"))
        sources, error = self._open_peers(records)
        statuses = self._allgather(_OPEN, error)
        bad = [f"rank {r}: {msg}" for r, msg in enumerate(statuses) if msg]
        if bad:
            raise DwdpPeerError("mapping peer memory failed on " + "; ".join(bad))
        self._transport.after_exchange()
        self._build(sources)
        logger.info("DWDP %s: %d layer(s), owns experts [%d, %d), buffers %.1f MiB",
                    self.comm.describe(), len(self._layers), *self.layout.owned_range(),
                    self.buffer_bytes / 2**20)

    def _open_peers(self, records: list[dict]) -> tuple[list[dict[int, dict[str, int]]], str]:
        """Map every peer tensor; ``sources[pos][peer][name]``: address of its byte 0 (expert
        ``P * peer``)."""
        sources: list[dict[int, dict[str, int]]] = []
        try:
            for pos, own in enumerate(self._own):
                per_peer: dict[int, dict[str, int]] = {}
                for peer in self.layout.peers:
                    per_peer[peer] = {name: self._transport.open(
                        peer, records[peer]["handles"][pos][name]) for name in own}
                sources.append(per_peer)
        except Exception as exc:
            # A message, not the exception: a kept log record must not pin this rank's frames.
            message = f"{type(exc).__name__}: {exc}"
            logger.error("DWDP rank %d could not map peer memory: %s", self.rank, message)
            return sources, message
        return sources, ""

    def _build(self, sources: list[dict[int, dict[str, int]]]) -> None:
        self._n = len(self._layers)
        self._stats = StatsRecorder(self._layers)
        if self.config.dwdp_size == 1:
            self._views = [[{n: [t] for n, t in own.items()}] * NUM_BUFFERS for own in self._own]
            self._composite_views = [[dict(own)] * NUM_BUFFERS for own in self._own]
            return
        order = peer_order(self.rank, self.config.dwdp_size)
        if self._composite_mode:
            per_peer_copies = self._build_composite(sources, order)
        else:
            per_peer_copies = self._build_multi(sources, order)
        for pos in range(self._n):
            self._plans.append([
                interleaved_plan(per_peer, self.config.prefetch_slice_bytes)
                if self.config.contention_opt else per_peer_plan(per_peer)
                for per_peer in per_peer_copies[pos]])
        if self.device.type == "cuda":
            from tensorrt_llm_dwdp.dwdp.copy_engine import CudaCopyEngine

            self._engine = CudaCopyEngine(self.device, self._stats, self.config.contention_opt)
        else:
            from tensorrt_llm_dwdp.dwdp.copy_engine import ThreadCopyEngine

            self._engine = ThreadCopyEngine(self._stats, name=f"dwdp-copy-r{self.rank}")

    def _build_multi(self, sources, order):
        """Separate buffers; ``[pos][b][peer index]``: that peer's copies."""
        self._buffers = PrefetchBuffers(self.layout, self._own, self.device)
        self._views = [[self._buffers.view(pos, b) for b in range(NUM_BUFFERS)]
                       for pos in range(self._n)]
        out = []
        for pos, own in enumerate(self._own):
            per_buffer = []
            for b in range(NUM_BUFFERS):
                per_peer = []
                for peer in order:
                    copies = []
                    for name, t in own.items():
                        dst, nbytes = self._buffers.dst(pos, b, peer, name)
                        skip = self.layout.source_starts[peer] * t[0].numel() * t.element_size()
                        copies.append((dst, sources[pos][peer][name] + skip, nbytes))
                    per_peer.append(copies)
                per_buffer.append(per_peer)
            out.append(per_buffer)
        return out

    def _build_composite(self, sources, order):
        from tensorrt_llm_dwdp.dwdp.composite_views import CompositeViews

        self._composite = CompositeViews(self._transport.vmm, self.layout, self._own,
                                         self._transport.locate, self.page_bytes)
        edges = self._composite.fill_edges(sources)
        logger.debug("DWDP rank %d: %d edge byte(s) filled from peers", self.rank, edges)
        self._views = [[self._composite.multi_view(pos, b) for b in range(NUM_BUFFERS)]
                       for pos in range(self._n)]
        self._composite_views = [[self._composite.view(pos, b) for b in range(NUM_BUFFERS)]
                                 for pos in range(self._n)]
        return [[self._composite.prefetch_copies(pos, b, sources[pos], order)
                 for b in range(NUM_BUFFERS)] for pos in range(self._n)]

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
        while self._queued < self._current + NUM_BUFFERS:
            self._queue(self._queued)

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
        rank, where it is the rank's own tensors)."""
        if self.config.dwdp_size > 1 and not self._composite_mode:
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
        self._queued = seq + 1

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
        not arrive within peer_timeout_s raises DwdpPeerError (after all local cleanup).
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
            if self._composite is not None:
                self._composite.close()
        except Exception as exc:
            error = error or exc
        try:
            self._transport.close_peers()
        except Exception as exc:
            error = error or exc
        if self.config.dwdp_size > 1 and not self._peer_failed:
            try:
                if not self._exchange_started:
                    self._allgather(_EXCHANGE, {"error": reason or "closed before exchange()"})
                self._allgather(_CLOSE, None)
            except DwdpPeerError as exc:
                error = error or exc
        try:
            self._transport.close()
        except Exception as exc:
            error = error or exc
        self._buffers, self._engine, self._plans, self._composite = None, None, [], None
        self._current = self._queued = 0  # weights()/done() now take the error path
        try:
            if self._peer_failed:
                self.comm.abandon()
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
