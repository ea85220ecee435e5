"""The three deployments a context server can run, and one step of each on every rank.

- ``replicated``: every GPU holds all experts and runs its own prompts (data parallel).
- ``dep``: attention data-parallel + expert parallel over S GPUs; each MoE layer dispatches
  tokens to the experts' owners and combines them back (all-to-all), so the S ranks advance in
  lockstep and every layer waits for the slowest rank.
- ``dwdp``: data parallel with the experts split over S GPUs (``ExpertLayout``: W owned, P
  pulled from each peer per layer, ``W + (S-1)*P == E``); ranks run free and hide the pulls
  behind their own compute (``copy_model``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout
from tensorrt_llm_dwdp.plan.copy_model import CopyParams, layer_copy
from tensorrt_llm_dwdp.plan.costs import CostSource
from tensorrt_llm_dwdp.plan.model import MoeModel
from tensorrt_llm_dwdp.plan.system import System
from tensorrt_llm_dwdp.plan.traffic import Chunk

REPLICATED, DEP, DWDP = "replicated", "dep", "dwdp"
TERMS = ("attention", "moe", "dense", "other", "a2a", "sync_wait", "copy_exposed", "interference")


@dataclass(frozen=True)
class Deployment:
    """One configuration: ``kind``, group size S and, for DWDP, W, P and contention_opt."""

    kind: str
    size: int
    experts_per_worker: int = 0
    prefetch: int = 0
    contention_opt: bool = False

    @property
    def label(self) -> str:
        if self.kind == REPLICATED:
            return "replicated"
        if self.kind == DEP:
            return f"DEP{self.size}"
        opt = "+copt" if self.contention_opt else ""
        return f"DWDP{self.size} W{self.experts_per_worker} P{self.prefetch}{opt}"

    def layout(self, num_experts: int) -> ExpertLayout:
        """Rank 0's layout; raises ValueError when W, P and S do not divide E."""
        return ExpertLayout(num_experts, self.size, self.experts_per_worker, self.prefetch, 0)


@dataclass
class RankStep:
    """One rank's step in milliseconds, by term; ``copy_ms`` is the peer copy in flight
    (hidden or not), ``tokens`` the prompt tokens it ran."""

    tokens: int
    attention: float = 0.0
    moe: float = 0.0
    dense: float = 0.0
    other: float = 0.0
    a2a: float = 0.0
    sync_wait: float = 0.0
    copy_exposed: float = 0.0
    interference: float = 0.0
    copy_ms: float = 0.0
    contention: float = 1.0
    copy_busy: float = 0.0   # fraction of the layer window spent copying (uncontended), 0..1

    @property
    def step_ms(self) -> float:
        """The sum of the TERMS (spelled out: the stream asks for it once per simulated step)."""
        return (self.attention + self.moe + self.dense + self.other + self.a2a + self.sync_wait
                + self.copy_exposed + self.interference)


def dwdp_layouts(model: MoeModel, size: int) -> list[tuple[int, int]]:
    """Every valid ``(W, P)`` for E experts over ``size`` ranks (``W + (S-1)*P == E``,
    ``1 <= P <= W``), fewest owned experts (least memory, most copying) first."""
    e = model.num_experts
    return sorted((e - (size - 1) * p, p) for p in range(1, e) if e - (size - 1) * p >= p)


def memory_per_gpu(dep: Deployment, model: MoeModel, system: System,
                   max_num_tokens: int) -> dict[str, float]:
    """Bytes per GPU: non-expert weights, experts (DWDP: ``L*W + 2*(S-1)*P`` slots from
    ``ExpertLayout.expert_memory``), the step's KV cache, the system's reserve; ``fits``."""
    eb, layers = model.expert_bytes, model.num_moe_layers
    if dep.kind == REPLICATED:
        experts = layers * model.num_experts * eb
    elif dep.kind == DEP:
        experts = layers * -(-model.num_experts // dep.size) * eb
    else:
        experts = dep.layout(model.num_experts).expert_memory(layers) * eb
    out = {"weights": float(model.non_expert_bytes), "experts": float(experts),
           "kv_step": float(model.kv_bytes_per_token * max_num_tokens),
           "reserved": float(system.reserved_mem)}
    out["total"] = sum(out.values())
    out["capacity"] = float(system.mem_capacity)
    out["fits"] = out["total"] <= system.mem_capacity
    return out


def group_step(dep: Deployment, chunks: Sequence[Sequence[Chunk]], costs: CostSource,
               model: MoeModel, system: System, copy: CopyParams,
               peer_busy: Sequence[float] | None = None) -> list[RankStep]:
    """One step of every rank of a group (``chunks[r]`` are rank r's); lists align.

    ``peer_busy[r]`` (DWDP only) is the mean copy duty of rank r's peers while it steps (a
    request stream knows which peers are idle); None: the ranks are alike (saturated)."""
    tokens = [sum(c.length for c in cs) for cs in chunks]
    if dep.kind == DEP:
        per = [costs.step(cs, dep.size, tokens) for cs in chunks]
        steps = [RankStep(t, **c.as_dict()) for t, c in zip(tokens, per)]
        own = [s.attention + s.dense + s.other for s in steps]
        slowest = max(own)
        for s, o in zip(steps, own):
            s.sync_wait = slowest - o
        return steps
    steps = []
    nbytes = (dep.size - 1) * dep.prefetch * model.expert_bytes
    for i, (t, cs) in enumerate(zip(tokens, chunks)):
        if not cs:
            steps.append(RankStep(0))
            continue
        c = costs.step(cs, 1, [t])
        s = RankStep(t, **c.as_dict())
        if dep.kind == DWDP:
            window = c.compute / model.num_moe_layers
            lc = layer_copy(nbytes, window, dep.size, system.nvlink_bw, copy, dep.contention_opt,
                            None if peer_busy is None else peer_busy[i])
            n = model.num_moe_layers
            s.copy_ms, s.contention, s.copy_busy = n * lc.copy_ms, lc.contention, lc.busy
            s.copy_exposed, s.interference = n * lc.exposed_ms, n * lc.interference_ms
        steps.append(s)
    return steps
