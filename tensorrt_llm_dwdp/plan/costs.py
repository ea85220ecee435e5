"""Operator costs of one context step on one rank, from a measured database.

Two sources answer the same question, "what do attention, MoE, dense GEMMs, the rest and the
all-to-all cost for these chunks on this rank", as ``StepCosts`` (milliseconds summed over all
layers):

- ``AicCosts``: aiconfigurator-core's per-operator database, queried through its engine API
  (``compile_engine`` + ``EngineHandle.run_static_per_op``), one engine per EP size, on a
  geometric token grid with linear interpolation between its points. The engine extrapolates
  silently past the token counts it collected, so MoE queries past the table's largest count
  are flagged here; a MoE point faster than the system's roofline (FLOPs / latency above
  peak, or the weight bytes a rank must read / latency above HBM bandwidth) is dropped,
  replaced by the roofline floor and reported. A DEP rank's MoE is the smaller of the EP
  table's figure and the one-rank figure at the group's mean tokens (same expert-token work,
  larger GEMMs per expert). Routing skew is not modelled: within the token counts the EP
  tables collected (at most 16384 tokens on GB200) the EP figure is below the one-rank
  figure, and above them the excess is the engine's extrapolation, not a measurement.
- ``MeasuredCosts`` (``plan/measured.py``): our own H200 bench JSON.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol, Sequence

from tensorrt_llm_dwdp.plan.model import FP8, NVFP4_SERVED_AS, NVFP4_SERVED_DTYPES, MoeModel
from tensorrt_llm_dwdp.plan.system import System, systems_dir
from tensorrt_llm_dwdp.plan.traffic import Chunk

log = logging.getLogger(__name__)
CATEGORIES = ("attention", "moe", "dense", "other", "a2a")
LENGTH_QUANTUM = 64  # chunk lengths are rounded to this many tokens before a database query


@dataclass
class StepCosts:
    """Milliseconds of one step on one rank, all layers, by category."""

    attention: float = 0.0
    moe: float = 0.0
    dense: float = 0.0
    other: float = 0.0
    a2a: float = 0.0

    @property
    def compute(self) -> float:
        return self.attention + self.moe + self.dense + self.other

    def as_dict(self) -> dict[str, float]:
        return {c: getattr(self, c) for c in CATEGORIES}


@dataclass
class Notes:
    """What a cost source wants the reader to know: extrapolated and dropped points.

    ``extrapolated[what] = (smallest, largest)`` token counts queried past the data."""

    extrapolated: dict[str, tuple[int, int]] = field(default_factory=dict)
    dropped: list[dict] = field(default_factory=list)

    def flag(self, what: str, tokens: int) -> None:
        lo, hi = self.extrapolated.get(what, (tokens, tokens))
        self.extrapolated[what] = (min(lo, tokens), max(hi, tokens))

    def messages(self) -> list[str]:
        return [f"{what}: queried at {lo}-{hi} tokens, extrapolated"
                for what, (lo, hi) in sorted(self.extrapolated.items())]


class CostSource(Protocol):
    name: str
    notes: Notes

    def describe(self) -> dict: ...

    def step(self, chunks: Sequence[Chunk], ep: int, group_tokens: Sequence[int]) -> StepCosts:
        """Costs of ``chunks`` on one rank. ``ep`` = 1: the rank runs every expert on its own
        tokens (DWDP, replicated); ``ep`` = S: attention-DP + EP over S ranks whose step token
        counts are ``group_tokens`` (MoE work follows their mean, the all-to-all their max)."""
        ...


def _category(op: str) -> str:
    if "dispatch" in op or "alltoall" in op or "a2a" in op:
        return "a2a"
    if "mla" in op or "attention" in op:
        return "attention"
    if op.endswith("_moe") or op == "context_moe":
        return "moe"
    if "gemm" in op:
        return "dense"
    return "other"


GRID_STEPS = 8  # geometric query grid: points per doubling of the token count


def _quantize(n: int) -> int:
    return max(LENGTH_QUANTUM, int(round(n / LENGTH_QUANTUM)) * LENGTH_QUANTUM)


def _grid_bracket(n: int) -> tuple[int, int]:
    """Multiples of LENGTH_QUANTUM on the geometric grid (GRID_STEPS per doubling) around ``n``."""
    if n <= LENGTH_QUANTUM:
        return LENGTH_QUANTUM, LENGTH_QUANTUM
    k = math.floor(math.log2(n / LENGTH_QUANTUM) * GRID_STEPS)
    lo = _quantize(LENGTH_QUANTUM * 2 ** (k / GRID_STEPS))
    hi = _quantize(LENGTH_QUANTUM * 2 ** ((k + 1) / GRID_STEPS))
    q = LENGTH_QUANTUM
    return min(lo, n // q * q), max(hi, -(-n // q) * q)


class AicCosts:
    """aiconfigurator-core's database for ``model`` on ``system`` (framework ``trtllm`` by
    default, its latest database version)."""

    def __init__(self, model: MoeModel, system: System, framework: str = "trtllm",
                 version: str | None = None) -> None:
        try:
            from aiconfigurator_core.sdk import perf_database
        except ImportError as exc:
            raise RuntimeError("plan needs aiconfigurator-core: pip install -e '.[plan]'") from exc
        if model.aic_id is None:
            raise ValueError(f"aiconfigurator-core cannot compile {model.name!r} offline; pass the "
                             f"folder holding its config.json, or a model it bundles")
        if model.quant == "nvfp4" and not system.flops.get("fp4"):
            raise ValueError(f"{system.name} has no FP4 tensor cores in aiconfigurator-core's "
                             f"system file; plan it with --quant fp8")
        self.model, self.system, self.framework = model, system, framework
        # the maintained default ("current" slot) is what get_latest_database_version returns
        # too; reading the slot skips parsing every system's collection metadata
        slots = perf_database.get_version_slots(system.name, framework)
        self.version = version or (slots or {}).get("current") \
            or perf_database.get_latest_database_version(system.name, framework)
        if self.version is None:
            raise ValueError(f"aiconfigurator-core has no {framework} database for {system.name}")
        self.quant_mode = "fp8_block" if model.quant == FP8 else model.quant
        self.name = f"aiconfigurator-core {_aic_version()} {framework} {self.version}"
        self.notes = Notes()
        self._ops_seen: dict[str, set[str]] = {}  # category -> the engine's op names in it
        self._engines: dict[int, object] = {}
        self._moe_max_tokens = _moe_coverage(system.name, framework, self.version, model,
                                             self.quant_mode)
        self._query = lru_cache(maxsize=None)(self._query_uncached)
        self._ops = lru_cache(maxsize=None)(self._ops_uncached)
        self._floor = lru_cache(maxsize=None)(self._floor_uncached)
        self._own_step = lru_cache(maxsize=None)(self._own_step_uncached)

    def describe(self) -> dict:
        return {"source": "aiconfigurator-core", "package_version": _aic_version(),
                "framework": self.framework, "database_version": self.version,
                "moe_quant_mode": self.quant_mode, "gemm_quant_mode": self.quant_mode,
                "engine_model": self.model.aic_id,
                "dtypes": NVFP4_SERVED_DTYPES if self.model.aic_id in NVFP4_SERVED_AS.values()
                else {"gemms and experts": self.quant_mode, "KV cache": "fp8",
                      "context FMHA": "bfloat16"},
                "attention": "bf16 context FMHA with an fp8 KV cache (no database has FP8 "
                             "context-MLA rows)",
                "ops_by_category": {c: sorted(ops) for c, ops in sorted(self._ops_seen.items())},
                "moe_max_tokens_collected": self._moe_max_tokens}

    def _engine(self, ep: int):
        if ep not in self._engines:
            from aiconfigurator_core.sdk.engine import EngineHandle, compile_engine
            log.debug("compiling %s engine for %s EP%d on %s", self.name, self.model.name, ep,
                      self.system.name)
            try:
                spec = compile_engine(
                    self.model.aic_id, self.system.name, self.framework, self.version,
                    attention_dp_size=ep, moe_ep_size=ep, moe_tp_size=1,
                    moe_quant_mode=self.quant_mode, gemm_quant_mode=self.quant_mode,
                    fmha_quant_mode="bfloat16", kvcache_quant_mode="fp8")
            except Exception as exc:  # the SDK raises its own error types; keep the message
                raise ValueError(f"aiconfigurator-core cannot model {self.model.name} "
                                 f"({self.quant_mode}) on {self.system.name}: "
                                 f"{str(exc).splitlines()[0]}") from exc
            self._engines[ep] = EngineHandle(spec)
        return self._engines[ep]

    def _query_uncached(self, ep: int, isl: int, prefix: int) -> tuple[tuple[str, float], ...]:
        try:
            ctx, _ = self._engine(ep).run_static_per_op(batch_size=1, isl=isl, prefix=prefix, osl=2)
        except Exception as exc:  # the SDK raises its own error types; keep the message
            raise ValueError(f"aiconfigurator-core has no {self.framework} data for "
                             f"{self.model.name} ({self.quant_mode}, EP{ep}) on {self.system.name}: "
                             f"{str(exc).splitlines()[0]}") from exc
        out: dict[str, float] = {}
        for name, ms, _energy, _src in ctx:
            cat = _category(name)
            out[cat] = out.get(cat, 0.0) + float(ms)
            if ms:
                self._ops_seen.setdefault(cat, set()).add(name)
        return tuple(sorted(out.items()))

    def _ops_uncached(self, ep: int, tokens: int, prefix: int = 0) -> dict[str, float]:
        """Category -> ms for one sequence of ``tokens`` new tokens after ``prefix`` cached
        ones. Without a prefix, linear between the two nearest points of a geometric grid
        (GRID_STEPS per doubling), so a stream of distinct lengths costs few engine queries."""
        if prefix:
            length, pre = _quantize(tokens), _quantize(prefix)
            return dict(self._query(ep, pre + length, pre))
        lo, hi = _grid_bracket(tokens)
        a, b = dict(self._query(ep, lo, 0)), dict(self._query(ep, hi, 0))
        w = 0.0 if hi == lo else (tokens - lo) / (hi - lo)
        return {k: (1 - w) * a.get(k, 0.0) + w * b.get(k, 0.0) for k in set(a) | set(b)}

    def step(self, chunks: Sequence[Chunk], ep: int, group_tokens: Sequence[int]) -> StepCosts:
        """See ``CostSource.step``. A rank's own step (ep = 1) depends on its chunks' lengths
        and prefixes only and is cached on them (a stream repeats them often); the returned
        record is shared, not to be modified."""
        if ep == 1:
            return self._own_step(tuple((c.length, c.prefix) for c in chunks))
        return self._step(chunks, ep, group_tokens)

    def _own_step_uncached(self, shape: tuple[tuple[int, int], ...]) -> StepCosts:
        chunks = [Chunk(i, n, pre) for i, (n, pre) in enumerate(shape)]
        return self._step(chunks, 1, [sum(n for n, _ in shape)])

    def _step(self, chunks: Sequence[Chunk], ep: int, group_tokens: Sequence[int]) -> StepCosts:
        cost = StepCosts()
        for c in chunks:
            cost.attention += self._ops(ep, c.length, c.prefix).get("attention", 0.0)
        tokens = max(1, sum(c.length for c in chunks))
        own = self._ops(ep, tokens)
        cost.dense, cost.other = own.get("dense", 0.0), own.get("other", 0.0)
        if ep == 1:
            cost.moe = self._screen_moe(own.get("moe", 0.0), tokens, 1)
        else:
            mean = max(1, sum(group_tokens) // len(group_tokens))
            ep_moe = self._screen_moe(self._ops(ep, mean).get("moe", 0.0), mean, ep)
            # An EP rank runs the same expert-token work as one rank holding every expert for
            # the group's mean tokens, with more tokens per expert: never slower when routing
            # is balanced. The EP tables stop at a few thousand tokens per rank and their
            # extrapolation can exceed that bound.
            full = self._screen_moe(self._ops(1, mean).get("moe", 0.0), mean, 1)
            cost.moe = min(ep_moe, full)
            cost.a2a = self._ops(ep, max(1, max(group_tokens))).get("a2a", 0.0)
        return cost

    def _screen_moe(self, ms: float, tokens: int, ep: int) -> float:
        """Flag extrapolation past the collected token counts; drop a roofline breaker."""
        m = self.model
        if self._moe_max_tokens and tokens * ep > self._moe_max_tokens:
            self.notes.flag(f"MoE EP{ep} (database collected up to {self._moe_max_tokens} "
                            f"tokens)", tokens * ep)
        if ms <= 0:
            return ms
        per_layer_s = ms / 1e3 / m.num_moe_layers
        floor, flops, weights = self._floor(tokens, ep)
        if per_layer_s < floor:
            if any(d["tokens"] == tokens and d["ep"] == ep for d in self.notes.dropped):
                return floor * 1e3 * m.num_moe_layers
            self.notes.dropped.append({
                "op": "moe", "tokens": tokens, "ep": ep, "latency_us": per_layer_s * 1e6,
                "implied_tflops": flops / per_layer_s / 1e12,
                "implied_hbm_tbps": weights / per_layer_s / 1e12,
                "peak_tflops": self.system.peak_flops(m.quant) / 1e12,
                "peak_hbm_tbps": self.system.hbm_bw / 1e12,
                "replaced_by_roofline_us": floor * 1e6})
            return floor * 1e3 * m.num_moe_layers
        return ms


    def _floor_uncached(self, tokens: int, ep: int) -> tuple[float, float, float]:
        """(roofline floor in s per layer, FLOPs, weight bytes read) of one MoE layer."""
        m = self.model
        flops = 2 * 3 * m.hidden * m.moe_inter * m.top_k * tokens
        # experts a rank must read: its E/ep, each picked by at least one of the tokens routed
        # over the group (tokens * ep, each choosing top_k of E) with uniform routing
        local = m.num_experts // ep
        touched = local * (1.0 - (1.0 - m.top_k / m.num_experts) ** (tokens * ep))
        weights = touched * m.expert_bytes
        floor = max(flops / self.system.peak_flops(m.quant), weights / self.system.hbm_bw)
        return floor, flops, weights


def _aic_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("aiconfigurator-core")
    except PackageNotFoundError:
        return "unknown"


@lru_cache(maxsize=None)
def _moe_coverage(system: str, framework: str, version: str, model: MoeModel,
                  quant_mode: str) -> int | None:
    """Largest token count collected for this MoE shape (None when the table is absent).

    The engine's query API interpolates without saying when it left the data, so the
    coverage is read from the MoE table's key columns (not its latencies) with pyarrow, which
    aiconfigurator-core itself depends on."""
    path = os.path.join(systems_dir(), "data", system, "moe", framework, version, "moe_perf.parquet")
    if not os.path.isfile(path):
        return None
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    t = pq.read_table(path, columns=["moe_dtype", "hidden_size", "inter_size", "num_experts",
                                     "topk", "num_tokens"])
    mask = pc.and_(pc.and_(pc.equal(t["moe_dtype"], quant_mode),
                           pc.equal(t["hidden_size"], model.hidden)),
                   pc.and_(pc.equal(t["inter_size"], model.moe_inter),
                           pc.equal(t["num_experts"], model.num_experts)))
    rows = t.filter(mask)["num_tokens"]
    return int(pc.max(rows).as_py()) if len(rows) else None
