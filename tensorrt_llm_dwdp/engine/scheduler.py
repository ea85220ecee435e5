"""Iteration-level scheduling: which sequences run in the next forward step.

Pure bookkeeping (no torch), so the policy is tested exhaustively on the CPU. A step is either
a prefill step (new prompts and chunks of long ones, packed up to a token budget) or a decode
step (one token for every running sequence). Prefill goes first: a context (prefill) worker's
job is to turn prompts into KV as soon as they arrive, and decode steps of a mixed worker wait
(a long prompt's chunks hold decode back for as many steps as it has chunks).
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request (``engine/sampling.py`` applies them).

    ``max_tokens`` counts generated tokens, the first one (produced by prefill) included.
    ``temperature`` 0 is greedy (the other sampling fields are then ignored); ``top_k`` 0,
    ``top_p`` 1 and ``min_p`` 0 switch their filter off. ``seed`` None: the engine draws a
    random seed when the request arrives.
    """

    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(eq=False)
class Sequence:
    """One request as the engine tracks it (mutable: outputs grow, slot is assigned)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    context_only: bool = False
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int = -1
    finish_reason: str | None = None
    # Tokens already in the KV cache (prompt tokens after prefill, then one per decode step).
    num_cached: int = 0

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(frozen=True)
class ScheduledStep:
    """The sequences of one forward step and how many new tokens each contributes.

    ``num_new[i]``: tokens sequence i feeds this step (a prompt chunk, or 1 for decode).
    ``emits[i]``: whether the step ends sequence i's prompt (or decodes), so its logits
    become a token; a chunk that leaves part of the prompt for later steps emits nothing.
    """

    is_prefill: bool
    sequences: tuple[Sequence, ...]
    num_new: tuple[int, ...]
    emits: tuple[bool, ...]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


class ContextLengthExceeded(ValueError):
    """A request whose prompt plus ``max_tokens`` the KV cache can never hold."""


class Scheduler:
    """FIFO admission with a slot pool and a per-step token budget (``max_batch_tokens``).

    Prefill goes first. Prompts already being prefilled continue first, then waiting prompts
    are admitted in FIFO order while the budget lasts. A prompt that fits one step is never
    split (if it does not fit what is left of this one, it waits for the next); a prompt
    longer than the budget is chunked: each step takes what the budget leaves, and the chunk
    attends to the KV its earlier chunks cached. Prompts that cannot fit ``max_seq_len`` are
    refused at ``add`` (``ContextLengthExceeded``), before they take a slot.
    """

    def __init__(self, max_seqs: int, max_batch_tokens: int, max_seq_len: int) -> None:
        for name, value in (("max_seqs", max_seqs), ("max_batch_tokens", max_batch_tokens),
                            ("max_seq_len", max_seq_len)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.max_seqs = max_seqs
        self.max_batch_tokens = max_batch_tokens
        self.max_seq_len = max_seq_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._free_slots = list(range(max_seqs - 1, -1, -1))

    def add(self, seq: Sequence) -> None:
        if not seq.prompt_ids:
            raise ValueError(f"request {seq.request_id!r}: empty prompt")
        need = len(seq.prompt_ids) + (1 if seq.context_only else seq.params.max_tokens)
        if need > self.max_seq_len:
            raise ContextLengthExceeded(
                f"request {seq.request_id!r}: prompt of {len(seq.prompt_ids)} tokens plus "
                f"max_tokens={seq.params.max_tokens} exceeds max_seq_len={self.max_seq_len}"
            )
        self.waiting.append(seq)

    def admit_running(self, seq: Sequence) -> None:
        """Take a sequence whose KV is already filled (disaggregated decode) straight to running."""
        seq.slot = self._take_slot(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def has_free_slot(self) -> bool:
        return bool(self._free_slots)

    def schedule(self) -> ScheduledStep | None:
        chunks: list[tuple[Sequence, int]] = []
        budget = self.max_batch_tokens
        for seq in self.running:  # prompts partly prefilled by earlier steps
            left = len(seq.prompt_ids) - seq.num_cached
            if left > 0 and budget > 0:
                chunks.append((seq, min(left, budget)))
                budget -= chunks[-1][1]
        while self.waiting and self._free_slots and budget > 0:
            seq = self.waiting[0]
            need = len(seq.prompt_ids)
            if need > budget and need <= self.max_batch_tokens:
                break  # fits a step of its own: not split, waits for the next
            self.waiting.popleft()
            seq.slot = self._take_slot(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append((seq, min(need, budget)))
            budget -= chunks[-1][1]
        if chunks:
            return ScheduledStep(True, tuple(s for s, _ in chunks), tuple(n for _, n in chunks),
                                 tuple(s.num_cached + n == len(s.prompt_ids) for s, n in chunks))
        decoding = tuple(s for s in self.running if s.num_cached >= len(s.prompt_ids))
        if decoding:
            return ScheduledStep(False, decoding, (1,) * len(decoding), (True,) * len(decoding))
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and release the slot (callers export KV before calling this)."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot >= 0:
            self._free_slots.append(seq.slot)
            seq.slot = -1

    def abort(self, request_id: str) -> Sequence | None:
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "abort"
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                self.finish(seq, "abort")
                return seq
        return None

    def _take_slot(self, seq: Sequence) -> int:
        if not self._free_slots:
            raise RuntimeError(f"request {seq.request_id!r}: no free KV slot (max_seqs={self.max_seqs})")
        return self._free_slots.pop()
