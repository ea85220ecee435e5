"""A deterministic stand-in for ``executor.Engine`` with the same contract, for fast HTTP tests.

Token i of a request is ``rule(prompt, i)``: lowercase letters derived from the prompt, and
EOS (257) at position ``eos_at(prompt)`` when the prompt's last id is a multiple of 5. Its KV
hand-over is a real ``KvHandoff`` whose tensor is the prompt itself, so the importing side can
prove the bytes it received belong to the request. ``step_s`` slows steps down so tests can
disconnect mid-request; ``fail_after`` makes ``step`` raise, as a broken device would.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tensorrt_llm_dwdp.engine.executor import EngineStats, Request, TokenEvent
from tensorrt_llm_dwdp.engine.kv_handoff import KvHandoff

EOS = 257


def rule(prompt: list[int], i: int) -> int:
    if prompt[-1] % 5 == 0 and i == prompt[-1] % 7 + 2:
        return EOS
    return ord("a") + (sum(prompt) * 31 + 7 * i) % 26


def expected(prompt: list[int], max_tokens: int) -> list[int]:
    out = []
    for i in range(max_tokens):
        out.append(rule(prompt, i))
        if out[-1] == EOS:
            break
    return out


@dataclass
class _Seq:
    req: Request
    out: list[int] = field(default_factory=list)


class EngineDouble:
    def __init__(self, step_s: float = 0.0, fail_after: int | None = None) -> None:
        self.step_s = step_s
        self.fail_after = fail_after
        self.dwdp = None
        self.stats = EngineStats()
        self.running: dict[str, _Seq] = {}
        self.exports: dict[str, KvHandoff] = {}
        self.aborted: list[str] = []
        self.imported: list[str] = []
        self.added: list[str] = []  # every request id add_request took, in order
        self.steps = 0

    def add_request(self, req: Request) -> None:
        if req.request_id in self.running:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        seq = _Seq(req)
        if req.kv_import is not None:
            kv = req.kv_import
            if list(kv.prompt_ids) != list(req.prompt_ids) or kv.tensors["kv"].tolist() != list(req.prompt_ids):
                raise ValueError("imported KV belongs to another prompt")
            seq.out.append(kv.first_token)
            self.imported.append(req.request_id)
        self.running[req.request_id] = seq
        self.added.append(req.request_id)

    def has_work(self) -> bool:
        return bool(self.running)

    def abort(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        self.exports.pop(request_id, None)
        return self.running.pop(request_id, None) is not None

    def export_kv(self, request_id: str) -> KvHandoff:
        return self.exports.pop(request_id)

    def step(self) -> list[TokenEvent]:
        self.steps += 1
        if self.fail_after is not None and self.steps > self.fail_after:
            raise RuntimeError("device fell off the bus")
        if self.step_s:
            time.sleep(self.step_s)
        events = []
        for rid, seq in list(self.running.items()):
            prompt = list(seq.req.prompt_ids)
            tok = rule(prompt, len(seq.out))
            seq.out.append(tok)
            reason = None
            if seq.req.context_only:
                reason = "context_done"
                self.exports[rid] = KvHandoff(tuple(prompt), tok, {"kv": torch.tensor(prompt, dtype=torch.int32)})
            elif tok == EOS and not seq.req.params.ignore_eos:
                reason = "stop"
            elif tok in seq.req.params.stop_token_ids:
                reason = "stop"
            elif len(seq.out) >= seq.req.params.max_tokens:
                reason = "length"
            if reason is not None:
                del self.running[rid]
            events.append(TokenEvent(rid, tok, reason is not None, reason))
        return events
