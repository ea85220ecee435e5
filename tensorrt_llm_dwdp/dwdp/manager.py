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
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch

from tensorrt_llm_dwdp.dwdp.agreement import record_problems, summarize
from tensorrt_llm_dwdp.comm import GroupComm, connect
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
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
        self._transport = transport if transport is not None else transport_for(self.device)
        self._layers: list[int] = []
        self._pos_of: dict[int, int] = {}
        self._own: list[dict[str, torch.Tensor]] = []
        self._handles: list[dict[str, HandleRecord]] = []
        self._views: list[list[dict[str, list[torch.Tensor]]]] | None = None
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
    def buffer_bytes(self) -> int:
        """Bytes held by the prefetch buffers (0 before exchange or with one rank)."""
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
                    handles[name] = self._transport.export(t)
                except DwdpRegistrationError as exc:
                    raise DwdpRegistrationError(f"{where}: {exc}") from exc
            own[name] = t
        self._pos_of[layer_idx] = len(self._layers)
        self._layers.append(layer_idx)
        self._own.append(own)
        self._handles.append(handles)

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
        """Map every peer tensor; ``sources[pos][peer][name]``: address of its first copied byte."""
        sources: list[dict[int, dict[str, int]]] = []
        try:
            for pos, own in enumerate(self._own):
                per_peer: dict[int, dict[str, int]] = {}
                for peer in self.layout.peers:
                    addrs = {}
                    for name, t in own.items():
                        rec = records[peer]["handles"][pos][name]
                        base = self._transport.open(peer, rec)
                        expert_bytes = t.numel() * t.element_size() // t.shape[0]
                        addrs[name] = base + self.layout.source_starts[peer] * expert_bytes
                    per_peer[peer] = addrs
                sources.append(per_peer)
        except Exception as exc:
            logger.error("DWDP rank %d could not map peer memory: %s", self.rank, exc)
            return sources, f"{type(exc).__name__}: {exc}"
        return sources, ""

    def _build(self, sources: list[dict[int, dict[str, int]]]) -> None:
        self._n = len(self._layers)
        self._stats = StatsRecorder(self._layers)
        if self.config.dwdp_size == 1:
            self._views = [[{n: [t] for n, t in own.items()}] * NUM_BUFFERS for own in self._own]
            return
        self._buffers = PrefetchBuffers(self.layout, self._own, self.device)
        self._views = [[self._buffers.view(pos, b) for b in range(NUM_BUFFERS)]
                       for pos in range(self._n)]
        order = peer_order(self.rank, self.config.dwdp_size)
        for pos, own in enumerate(self._own):
            plans = []
            for b in range(NUM_BUFFERS):
                per_peer = []
                for peer in order:
                    copies = []
                    for name in own:
                        dst, nbytes = self._buffers.dst(pos, b, peer, name)
                        copies.append((dst, sources[pos][peer][name], nbytes))
                    per_peer.append(copies)
                plans.append(interleaved_plan(per_peer, self.config.prefetch_slice_bytes)
                             if self.config.contention_opt else per_peer_plan(per_peer))
            self._plans.append(plans)
        if self.device.type == "cuda":
            from tensorrt_llm_dwdp.dwdp.copy_engine import CudaCopyEngine

            self._engine = CudaCopyEngine(self.device, self._stats, self.config.contention_opt)
        else:
            from tensorrt_llm_dwdp.dwdp.copy_engine import ThreadCopyEngine

            self._engine = ThreadCopyEngine(self._stats, name=f"dwdp-copy-r{self.rank}")

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
        seq = self._current
        pos = self._pos_of.get(layer_idx)
        if pos is None or seq >= self._queued or pos != seq % self._n:
            self._state_error("weights", layer_idx)
        if self._engine is not None:
            self._engine.wait(seq & 1, pos)
        return self._views[pos][seq & 1]

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
        if self._buffers is None:
            return
        if self._engine is not None:
            self._engine.synchronize()
        self._buffers.fill_(byte)
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
        self._views, self._buffers, self._engine, self._plans = None, None, None, []
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
