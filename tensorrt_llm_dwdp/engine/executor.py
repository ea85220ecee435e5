"""The engine: turns requests into forward steps and sampled (or greedy) tokens on one rank.

One engine per process, driven from one thread. Each ``step()`` runs one forward pass (a
packed prefill of new prompts and chunks of longer ones, or one decode token for every running
sequence), turns the logits of the sequences that are due a token into tokens (``_sample``),
and returns them. With DWDP on, the step opens with ``dwdp.start_step()`` so the first MoE
layers' missing experts are already in flight; the MoE layers themselves call ``weights(i)`` /
``done(i)``. No collective runs here: ranks step independently.

A step that raises (CUDA out of memory included) ends that step's requests only: the engine
raises ``StepFailed`` naming them and stays usable. An error that leaves the device or the
DWDP manager unusable is raised as it is: the caller must stop.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from tensorrt_llm_dwdp.engine.decode_graphs import DecodeGraphs, batch_buckets
from tensorrt_llm_dwdp.engine.graph_pieces import GraphBreaks
from tensorrt_llm_dwdp.engine.kv_handoff import KvHandoff
from tensorrt_llm_dwdp.engine.sampling import Sampler, resolve_seed
from tensorrt_llm_dwdp.engine.scheduler import SamplingParams, ScheduledStep, Scheduler, Sequence
from tensorrt_llm_dwdp.moe.backends import (check_routing, compile_stats, distinct_backends,
                                            graph_safe)

logger = logging.getLogger(__name__)


class StepFailed(RuntimeError):
    """One step's forward raised; its requests (``request_ids``) were ended with reason
    ``error`` and the engine can run the next step. The cause is ``__cause__``."""

    def __init__(self, request_ids: tuple[str, ...], cause: BaseException) -> None:
        super().__init__(f"step failed ({type(cause).__name__}: {cause}); its requests were "
                         f"dropped: {list(request_ids)}")
        self.request_ids = request_ids
        self.out_of_memory = isinstance(cause, torch.cuda.OutOfMemoryError)


@dataclass(frozen=True)
class KvBudget:
    """What the KV cache holds, known at start-up: ``slots`` sequences of up to ``max_seq_len``
    tokens (prompt plus generated), ``bytes_per_token`` over all layers, ``nbytes`` in all."""

    slots: int
    max_seq_len: int
    bytes_per_token: int
    nbytes: int

    def describe(self) -> str:
        return (f"{self.slots} slots x {self.max_seq_len} tokens, {self.bytes_per_token / 1024:.1f} "
                f"KiB/token, {self.nbytes / 2**30:.3f} GiB; a request needs prompt + max_tokens "
                f"<= {self.max_seq_len}")


@dataclass(frozen=True)
class Request:
    """A generation request. ``context_only`` stops after prefill's first token and keeps the
    KV for ``Engine.export_kv``; ``kv_import`` starts decode from a context server's KV."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = SamplingParams()
    context_only: bool = False
    kv_import: KvHandoff | None = None


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token_id: int
    finished: bool
    finish_reason: str | None = None


STEP_LOG_LEN = 8192  # step records kept (the newest); the counters cover every step


@dataclass(frozen=True)
class StepRecord:
    """One step as this rank ran it.

    ``index``: steps recorded before it. ``kind``: ``prefill``, ``decode`` or ``idle`` (an
    expert-parallel rank joining its group's step with no tokens). ``start``: ``time.time()``
    when the step's forward began, comparable between processes of one host. ``wall_s``: from
    then until its outputs were on the host (device synchronised). ``device_s``: CUDA-event
    time over the same span on the rank's stream (None on a CPU); the events see the GPU's
    clock, so it includes other processes' time slices on a shared GPU and host stalls
    between launches alike, and falls short of ``wall_s`` only by host time outside the
    stream's span (before the first launch reached the GPU, after the last finished).
    ``compiles`` / ``compile_s``: kernels JIT-compiled inside the step and the seconds it took.
    """

    index: int
    kind: str
    start: float
    wall_s: float
    device_s: float | None
    tokens: int
    sequences: int
    compiles: int = 0
    compile_s: float = 0.0

    def to_dict(self) -> dict:
        # Its fields are plain values: a shallow copy (``dataclasses.asdict`` deep-copies each
        # field, 12 us a record, 98 ms for a full log).
        return dict(self.__dict__)


@dataclass
class EngineStats:
    """Counters since the engine started (seconds are wall time with the device synchronised;
    ``*_device_seconds`` CUDA-event time, 0 on a CPU) and the newest ``STEP_LOG_LEN`` steps.
    ``idle_*``: steps an expert-parallel rank joined with no tokens (``LockstepEngine``)."""

    prefill_steps: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    prefill_device_seconds: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_device_seconds: float = 0.0
    idle_steps: int = 0
    idle_seconds: float = 0.0
    kernel_compiles: int = 0
    kernel_compile_seconds: float = 0.0
    step_count: int = 0   # steps recorded since the start, idle ones included
    steps: deque = field(default_factory=lambda: deque(maxlen=STEP_LOG_LEN))

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def record(self, kind: str, start: float, wall_s: float, device_s: float | None, tokens: int,
               sequences: int, compiles: int = 0, compile_s: float = 0.0) -> StepRecord:
        """Count one step and append its record to the log."""
        if kind == "prefill":
            self.prefill_steps += 1
            self.prefill_tokens += tokens
            self.prefill_seconds += wall_s
            self.prefill_device_seconds += device_s or 0.0
        elif kind == "decode":
            self.decode_steps += 1
            self.decode_tokens += tokens
            self.decode_seconds += wall_s
            self.decode_device_seconds += device_s or 0.0
        elif kind == "idle":
            self.idle_steps += 1
            self.idle_seconds += wall_s
        else:
            raise ValueError(f"step kind {kind!r}; one of prefill, decode, idle")
        self.kernel_compiles += compiles
        self.kernel_compile_seconds += compile_s
        rec = StepRecord(self.step_count, kind, start, wall_s, device_s, tokens, sequences,
                         compiles, compile_s)
        self.step_count += 1
        self.steps.append(rec)
        return rec

    def steps_after(self, index: int) -> list[StepRecord]:
        """Logged steps with ``index`` greater than ``index`` (-1: every logged step)."""
        skip = max(0, index + 1 - (self.step_count - len(self.steps)))  # the log holds the newest
        return list(itertools.islice(self.steps, skip, None)) if skip < len(self.steps) else []


class StepClock:
    """Times one step: host wall clock and, on a GPU, CUDA events on the current stream, plus
    the kernels ``backends`` (``moe.backends.compile_stats``) compiled meanwhile."""

    def __init__(self, device: torch.device | str, backends: list | tuple = ()) -> None:
        self.device = torch.device(device)
        self.backends = backends
        self.cuda = self.device.type == "cuda"

    def start(self) -> tuple:
        ev = None
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
        return time.time(), time.perf_counter(), ev, compile_stats(self.backends)

    def stop(self, token: tuple) -> tuple[float, float, float | None, int, float]:
        """``(start, wall_s, device_s, compiles, compile_s)``; synchronises the device."""
        start, t0, ev0, (n0, s0) = token
        device_s = None
        if self.cuda:
            ev1 = torch.cuda.Event(enable_timing=True)
            ev1.record()
            torch.cuda.synchronize(self.device)
            device_s = ev0.elapsed_time(ev1) / 1e3
        wall_s = time.perf_counter() - t0
        n1, s1 = compile_stats(self.backends)
        return start, wall_s, device_s, n1 - n0, s1 - s0


class Engine:
    """Continuous-batching engine over a ``CausalLM`` and its KV cache.

    ``record_logits=True`` keeps every step's logits (float32, on the CPU) per request, which
    the parity check compares bit for bit between DWDP and single-rank runs.
    ``kv_export_alloc(nbytes)`` gives a context-only request's exported KV its memory (a
    block of the server's export pool, ``serve/kv_pool.py``) or None for a buffer of its own.
    ``cuda_graphs``: replay decode steps from CUDA graphs, one per batch-size bucket
    (``graph_batch_sizes``, default powers of two up to ``max_seqs``) and context bucket,
    captured at first use (``engine.decode_graphs``); on a CPU, or when a MoE layer cannot be
    captured (expert parallelism, a host-driven backend), decode stays eager (logged).
    """

    def __init__(self, model, *, dwdp=None, max_seqs: int = 16, max_seq_len: int = 2048,
                 max_batch_tokens: int = 8192, device: torch.device | str = "cpu",
                 eos_token_id: int | None = None, record_logits: bool = False,
                 kv_export_alloc: Callable[[int], Any] | None = None, cuda_graphs: bool = False,
                 graph_batch_sizes: list[int] | tuple[int, ...] | None = None) -> None:
        self.model = model
        self.kv_export_alloc = kv_export_alloc
        self.dwdp = dwdp
        self.device = torch.device(device)
        self.eos_token_id = eos_token_id
        self.record_logits = record_logits
        self.scheduler = Scheduler(max_seqs, max_batch_tokens, max_seq_len)
        use_graphs = cuda_graphs and self._graphs_possible(model)
        if use_graphs:  # checked before anything is allocated
            batch_buckets(max_seqs, graph_batch_sizes)
        try:
            # with graphs, one slot more: the scratch slot that padding rows write
            self.cache = model.make_cache(max_seqs + (1 if use_graphs else 0), max_seq_len,
                                          self.device)
        except torch.cuda.OutOfMemoryError as exc:
            raise RuntimeError(f"the KV cache of {max_seqs} slots x {max_seq_len} tokens does not fit "
                               f"on {self.device}; lower max_batch_size or max_seq_len") from exc
        self.kv_budget = KvBudget(max_seqs, max_seq_len, self.cache.bytes_per_token, self.cache.nbytes)
        logger.info("KV cache on %s: %s; prefill steps of up to %d tokens (longer prompts are "
                    "chunked)", self.device, self.kv_budget.describe(), max_batch_tokens)
        self.sampler = Sampler(self.device)
        self.stats = EngineStats()
        self.clock = StepClock(self.device, _backends_of(model))
        self.graphs: DecodeGraphs | None = None
        if use_graphs:
            breaks = GraphBreaks()
            for moe in model.moe_modules().values():
                if moe.dwdp is not None:
                    moe.graph_breaks = breaks
            self.graphs = DecodeGraphs(model, self.cache, max_seqs=max_seqs, device=self.device,
                                       breaks=breaks, batch_sizes=graph_batch_sizes)
            logger.info("decode steps replay CUDA graphs for batch sizes %s (captured at first "
                        "use)", list(self.graphs.buckets))
        self.logits: dict[str, list[torch.Tensor]] = {}
        self._sequences: dict[str, Sequence] = {}
        self._exports: dict[str, KvHandoff] = {}
        # Imported contexts waiting for a free slot (a generation server at capacity queues them).
        self._imports: deque[tuple[Sequence, KvHandoff]] = deque()

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self._sequences:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        seq = Sequence(request.request_id, list(request.prompt_ids), resolve_seed(request.params),
                       context_only=request.context_only)
        if request.kv_import is not None:
            self._admit_imported(seq, request.kv_import)
        else:
            self.scheduler.add(seq)
        self._sequences[seq.request_id] = seq

    def abort(self, request_id: str) -> bool:
        queued = [item for item in self._imports if item[0].request_id == request_id]
        for item in queued:
            self._imports.remove(item)
        seq = self.scheduler.abort(request_id) or (queued[0][0] if queued else None)
        self._sequences.pop(request_id, None)
        self._exports.pop(request_id, None)
        return seq is not None

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._imports)

    def export_kv(self, request_id: str) -> KvHandoff:
        """Hand over (once) the KV of a finished context-only request."""
        try:
            return self._exports.pop(request_id)
        except KeyError:
            raise KeyError(f"no exported KV for request {request_id!r} (not context_only, "
                           "not finished, or already taken)") from None

    # ---- stepping -------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        self._load_imports()
        plan = self.scheduler.schedule()
        if plan is None:
            return []
        timing = self.clock.start()
        try:
            logits = self._forward_checked(plan)
            emitting = [i for i, e in enumerate(plan.emits) if e]
            if len(emitting) < len(plan.sequences):
                logits = logits[emitting]
            tokens = self._sample(logits, [plan.sequences[i] for i in emitting])
            check_routing(self.clock.backends)  # bad expert ids, flagged on the device
        except Exception as exc:
            if not (self._drop_failed(plan, exc) and self._device_usable(exc)):
                raise
            raise StepFailed(tuple(s.request_id for s in plan.sequences), exc) from exc
        except BaseException as exc:  # KeyboardInterrupt and friends: drop, then let it through
            self._drop_failed(plan, exc)
            raise
        start, wall_s, device_s, compiles, compile_s = self.clock.stop(timing)
        self.stats.record("prefill" if plan.is_prefill else "decode", start, wall_s, device_s,
                          plan.num_tokens, len(plan.sequences), compiles, compile_s)
        if self.record_logits:
            cpu = logits.float().cpu()
            for row, i in enumerate(emitting):
                self.logits.setdefault(plan.sequences[i].request_id, []).append(cpu[row].clone())
        for seq, n in zip(plan.sequences, plan.num_new):
            seq.num_cached += n
        return [self._advance(plan.sequences[i], tok) for i, tok in zip(emitting, tokens)]

    def generate(self, prompts: list[list[int]], params: SamplingParams = SamplingParams(),
                 progress=None) -> list[list[int]]:
        """Run prompts to completion; returns generated ids in prompt order."""
        ids = [f"gen-{len(self._sequences)}-{i}" for i in range(len(prompts))]
        for rid, prompt in zip(ids, prompts):
            self.add_request(Request(rid, prompt, params))
        outputs: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_work():
            for ev in self.step():
                if ev.request_id in outputs:
                    outputs[ev.request_id].append(ev.token_id)
            if progress is not None:
                progress.update(1)
        for rid in ids:
            self._sequences.pop(rid, None)
        return [outputs[rid] for rid in ids]

    # ---- internals ------------------------------------------------------------------------
    def _forward(self, plan: ScheduledStep) -> torch.Tensor:
        from tensorrt_llm_dwdp.model.batch import BatchInfo

        tokens: list[int] = []
        for seq, n in zip(plan.sequences, plan.num_new):
            if plan.is_prefill:
                tokens.extend(seq.prompt_ids[seq.num_cached:seq.num_cached + n])
            else:
                tokens.append(seq.output_ids[-1])
        batch = BatchInfo(slots=tuple(s.slot for s in plan.sequences),
                          start_positions=tuple(s.num_cached for s in plan.sequences),
                          lengths=plan.num_new)
        graphed = self.graphs is not None and self.graphs.bucket(batch) is not None
        input_ids = None if graphed else torch.tensor(tokens, dtype=torch.long, device=self.device)
        if self.dwdp is not None:
            self.dwdp.start_step()
        with torch.inference_mode():
            if graphed:
                return self.graphs.run(tokens, batch)
            return self.model(input_ids, batch, self.cache)

    def _forward_checked(self, plan: ScheduledStep) -> torch.Tensor:
        """``_forward``, run again while the DWDP manager reports that a peer this step read
        went down under it (``DwdpStepRetry``: it has already moved that peer's experts to the
        host store). A rerun rewrites the same KV positions; no sequence has advanced yet."""
        from tensorrt_llm_dwdp.dwdp.errors import DwdpStepRetry

        retries = 0
        while True:
            logits = self._forward(plan)
            if self.dwdp is None:
                return logits
            try:
                self.dwdp.end_step()
                return logits
            except DwdpStepRetry as exc:
                retries += 1
                if retries >= self.dwdp.config.dwdp_size:  # each retry lost another peer
                    raise
                logger.warning("%s (retry %d of the step)", exc, retries)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """Where logits become tokens: one row per sequence that is due a token."""
        return self.sampler.sample(logits, [s.params for s in seqs], [len(s.output_ids) for s in seqs])

    def _graphs_possible(self, model) -> bool:
        """Whether this engine's decode steps can be captured; logs why not."""
        why = None
        if self.device.type != "cuda":
            why = f"the engine runs on {self.device}"
        elif not hasattr(model, "run_step"):
            why = f"{type(model).__name__} has no run_step"
        else:
            moes = getattr(model, "moe_modules", dict)()
            for i, moe in moes.items():
                weights = moe.local_weights
                if moe.ep is not None:
                    why = f"MoE layer {i} is expert-parallel (a collective per layer)"
                elif weights is not None and not graph_safe(moe.backend, weights.quant):
                    why = (f"MoE layer {i}'s backend {type(moe.backend).__name__} reads the "
                           f"device back for {weights.quant} experts")
                if why:
                    break
        if why:
            logger.info("CUDA graphs off: %s; decode steps run eagerly", why)
        return why is None

    def _device_usable(self, exc: Exception) -> bool:
        """After a failed step: False when the device is left in an error state (a failing
        synchronize: a sticky CUDA error), so no later step could run either."""
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
            except Exception as sync_exc:
                exc.add_note(f"the device is unusable after the failure: {sync_exc}")
                return False
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()  # give the failed step's cached blocks back
        return True

    def _drop_failed(self, plan: ScheduledStep, exc: BaseException) -> bool:
        """A forward raised: end its sequences and the DWDP step so the engine stays usable.
        Returns False when the DWDP manager could not abort its step (then it is unusable).

        Without this the manager stays mid-step (every later ``start_step`` fails) and a failed
        prefill's sequences stay running with no KV, never scheduled again (``has_work`` forever).
        """
        aborted = True
        if self.dwdp is not None:
            try:
                self.dwdp.abort_step()
            except Exception as abort_exc:  # keep the forward's error, which is the cause
                logger.error("DWDP abort_step after a failed step also failed: %s", abort_exc)
                aborted = False
        ids = []
        for seq in plan.sequences:
            self.scheduler.finish(seq, "error")
            self._sequences.pop(seq.request_id, None)
            ids.append(seq.request_id)
        exc.add_note(f"the failed step's requests were dropped: {ids}")
        return aborted

    def _advance(self, seq: Sequence, token: int) -> TokenEvent:
        seq.output_ids.append(token)
        reason = None
        if seq.context_only:
            reason = "context_done"
            self._exports[seq.request_id] = KvHandoff.from_cache(
                self.cache, seq.slot, seq.prompt_ids, token, alloc=self.kv_export_alloc)
        elif not seq.params.ignore_eos and token == self.eos_token_id:
            reason = "stop"
        elif token in seq.params.stop_token_ids:
            reason = "stop"
        elif len(seq.output_ids) >= seq.params.max_tokens:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._sequences.pop(seq.request_id, None)
        return TokenEvent(seq.request_id, token, reason is not None, reason)

    def _admit_imported(self, seq: Sequence, handoff: KvHandoff) -> None:
        if list(handoff.prompt_ids) != seq.prompt_ids:
            raise ValueError(f"request {seq.request_id!r}: imported KV belongs to another prompt")
        if seq.params.max_tokens < 2:
            raise ValueError(f"request {seq.request_id!r}: an imported context already holds the "
                             "first token; decode needs max_tokens >= 2")
        self.scheduler.add(seq)  # validates lengths against max_seq_len
        self.scheduler.waiting.remove(seq)
        self.cache.check_import(handoff.tensors)  # a malformed blob fails now, holding no slot
        self._imports.append((seq, handoff))
        self._load_imports()

    def _load_imports(self) -> None:
        """Move queued imported contexts into free slots, oldest first."""
        while self._imports and self.scheduler.has_free_slot():
            seq, handoff = self._imports.popleft()
            self.scheduler.admit_running(seq)
            try:
                handoff.write_to_cache(self.cache, seq.slot)
            except BaseException:  # give the slot back, leave nothing running
                self.scheduler.finish(seq, "error")
                self._sequences.pop(seq.request_id, None)
                raise
            seq.num_cached = len(seq.prompt_ids)
            seq.output_ids.append(handoff.first_token)


def _backends_of(model) -> list:
    """The distinct MoE backends of ``model`` (none for a model without ``moe_modules``)."""
    moes = getattr(model, "moe_modules", None)
    return distinct_backends(moes().values()) if moes is not None else []
