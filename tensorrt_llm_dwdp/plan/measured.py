"""Operator costs from our own H200 bench JSON (``bench/prefill_breakdown.py``).

``bench/results/prefill_breakdown_h200/prefill_breakdown.json`` times whole prefill steps of a
DeepSeek-V3-shaped NVFP4 model on one H200 (our runtime: CuTeDSL W4A16 MoE, cuDNN attention)
and splits each into attention (its kernel apart), routed experts, shared expert, dense MLP and
the rest. Fitted per layer:

- token-linear terms ``a + b*T`` (attention projections, routed experts, shared expert, dense
  MLP, the rest) over the points' step token counts T;
- the attention kernel per prompt k(l), log-log interpolated between knots: the in-step kernel
  time per prompt at the breakdown's prompt lengths, continued past the longest with the slope of
  the same JSON's single-prompt kernel microbenchmark (``attention_kernels_table``); a chunk of
  length c after a cached prefix p costs ``k(p + c) - k(p)`` (the causal rows it adds).

Queries outside the fitted token counts or prompt lengths are flagged as extrapolated. Only
DeepSeek-V3 expert shapes (H 7168, I 2048, E 256, NVFP4) on ``h200_sxm`` are covered. The
all-to-all of EP (not in the breakdown) is its payload over the measured peer-copy bandwidth:
each token goes once to every other rank that owns one of its top-k experts, bf16, dispatch
and combine.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from tensorrt_llm_dwdp.plan.costs import Notes, StepCosts
from tensorrt_llm_dwdp.plan.model import MoeModel
from tensorrt_llm_dwdp.plan.reference import COPY_H200
from tensorrt_llm_dwdp.plan.system import System
from tensorrt_llm_dwdp.plan.traffic import Chunk

BREAKDOWN_JSON = "bench/results/prefill_breakdown_h200/prefill_breakdown.json"
LINEAR = ("attention_proj", "routed_experts", "shared_expert", "dense_mlp", "rest")
SHAPE = {"hidden": 7168, "moe_inter": 2048, "num_experts": 256, "quant": "nvfp4"}


def repo_file(rel: str) -> str:
    """``rel`` inside the source checkout this package was imported from."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        raise ValueError(f"--costs measured needs {rel} (present in a source checkout)")
    return path


@dataclass(frozen=True)
class BreakdownFit:
    """Per-layer costs in ms: ``linear[name] = (a, b)`` for ``a + b*T``; attention kernel per
    prompt at ``kernel_knots`` ((length, ms), ascending); the token and prompt-length ranges."""

    linear: dict[str, tuple[float, float]]
    kernel_knots: tuple[tuple[int, float], ...]
    tokens: tuple[int, int]
    points: tuple[str, ...]

    @property
    def lengths(self) -> tuple[int, int]:
        return self.kernel_knots[0][0], self.kernel_knots[-1][0]

    def kernel(self, length: float) -> float:
        """Per-layer attention kernel ms of one prompt of ``length`` tokens (log-log linear
        between knots, the end slopes beyond them)."""
        if length <= 0:
            return 0.0
        x = np.log([k[0] for k in self.kernel_knots])
        y = np.log([k[1] for k in self.kernel_knots])
        i = int(np.clip(np.searchsorted(x, math.log(length)) - 1, 0, len(x) - 2))
        slope = (y[i + 1] - y[i]) / (x[i + 1] - x[i])
        return float(math.exp(y[i] + slope * (math.log(length) - x[i])))


def fit_breakdown(data: dict, names: Sequence[str] | None = None) -> BreakdownFit:
    """Fit the unchunked points of a prefill_breakdown JSON (all, or those in ``names``)."""
    meta = data["meta"]
    layers, moe_layers = meta["num_layers"], meta["num_moe_layers"]
    per = {"attention_proj": layers, "routed_experts": moe_layers, "shared_expert": moe_layers,
           "dense_mlp": layers - moe_layers, "rest": layers}
    pts = [p for p in data["points"] if not p.get("chunk") and (names is None or p["point"] in names)]
    if len({p["tokens"] for p in pts}) < 2 or len({p["prompt_len"] for p in pts}) < 2:
        raise ValueError("fit_breakdown needs points at two token counts and two prompt lengths")
    t = np.array([p["tokens"] for p in pts], dtype=float)
    linear = {}
    for name in LINEAR:
        y = np.array([(p["ms"]["attention"] - p["ms"]["attention_kernel"] if name == "attention_proj"
                       else p["ms"][name]) / per[name] for p in pts])
        b, a = np.polyfit(t, y, 1)
        linear[name] = (float(a), float(b))
    per_len: dict[int, list[float]] = {}
    for p in pts:
        per_len.setdefault(p["prompt_len"], []).append(
            p["ms"]["attention_kernel"] / layers / p["prompts"])
    knots = [(n, float(np.mean(v))) for n, v in sorted(per_len.items())]
    micro = {r["length"]: r["per_prompt_ms"] for r in data.get("attention_kernels_table", [])
             if r.get("prompts") == 1 and "length" in r}
    last, last_ms = knots[-1]
    if last in micro:
        knots += [(n, last_ms * ms / micro[last]) for n, ms in sorted(micro.items()) if n > last]
    return BreakdownFit(linear, tuple(knots), (int(t.min()), int(t.max())),
                        tuple(p["point"] for p in pts))


class MeasuredCosts:
    """``CostSource`` over a ``BreakdownFit``; ``level(T)`` optionally rescales every term so a
    step of T tokens totals a measured one-GPU step time (see ``bench/plan_validation.py``)."""

    def __init__(self, fit: BreakdownFit, model: MoeModel, system: System,
                 level: Callable[[int], float] | None = None, label: str = "") -> None:
        for key, want in SHAPE.items():
            if getattr(model, key) != want:
                raise ValueError(f"--costs measured covers DeepSeek-V3 NVFP4 experts only; "
                                 f"{model.name} has {key}={getattr(model, key)}")
        if system.name != "h200_sxm":
            raise ValueError(f"--costs measured has H200 data only, not {system.name}")
        self.fit, self.model, self.system, self.level = fit, model, system, level
        self.name = f"measured: our H200 bench JSON ({label or BREAKDOWN_JSON})"
        self.notes = Notes()

    @classmethod
    def from_breakdown(cls, model: MoeModel, system: System) -> "MeasuredCosts":
        with open(repo_file(BREAKDOWN_JSON)) as f:
            return cls(fit_breakdown(json.load(f)), model, system)

    def describe(self) -> dict:
        f = self.fit
        return {"source": "measured", "json": BREAKDOWN_JSON, "points": list(f.points),
                "linear_ms_per_layer": {k: {"a": a, "b_per_token": b} for k, (a, b) in f.linear.items()},
                "attention_kernel_knots_ms": [list(k) for k in f.kernel_knots],
                "fitted_tokens": list(f.tokens), "fitted_prompt_lengths": list(f.lengths)}

    def _lin(self, name: str, tokens: int) -> float:
        a, b = self.fit.linear[name]
        return max(0.0, a + b * tokens)

    def step(self, chunks: Sequence[Chunk], ep: int, group_tokens: Sequence[int]) -> StepCosts:
        m, f = self.model, self.fit
        tokens = sum(c.length for c in chunks)
        if not chunks:
            return StepCosts()
        if not f.tokens[0] <= tokens <= f.tokens[1]:
            self.notes.flag(f"measured token-linear terms (fitted {f.tokens[0]}-{f.tokens[1]} tokens)", tokens)
        dense_layers = m.num_layers - m.num_moe_layers
        kernel = 0.0
        for c in chunks:
            if not f.lengths[0] <= c.prefix + c.length <= f.lengths[1]:
                self.notes.flag(f"measured attention kernel (fitted prompts {f.lengths[0]}-"
                                f"{f.lengths[1]})", c.prefix + c.length)
            kernel += f.kernel(c.prefix + c.length) - f.kernel(c.prefix)
        cost = StepCosts(
            attention=m.num_layers * (self._lin("attention_proj", tokens) + kernel),
            moe=m.num_moe_layers * self._lin("routed_experts", tokens),
            dense=m.num_moe_layers * self._lin("shared_expert", tokens)
            + dense_layers * self._lin("dense_mlp", tokens),
            other=m.num_layers * self._lin("rest", tokens))
        scale = self.level(tokens) / cost.compute if self.level is not None else 1.0
        for name in ("attention", "moe", "dense", "other"):
            setattr(cost, name, getattr(cost, name) * scale)
        if ep > 1:
            # same expert-token work as one rank holding every expert for the mean tokens
            mean = int(sum(group_tokens) / len(group_tokens))
            cost.moe = m.num_moe_layers * self._lin("routed_experts", mean) * scale
            cost.a2a = m.num_moe_layers * a2a_ms(max(group_tokens), m, ep, self.system.nvlink_bw)
        return cost


def a2a_ms(tokens: int, model: MoeModel, ep: int, link_bw: float) -> float:
    """One MoE layer's dispatch + combine on the rank sending ``tokens`` (ms): each token to
    every other rank owning one of its top-k experts (uniform routing), bf16 hidden states."""
    e, k, own = model.num_experts, model.top_k, model.num_experts // ep
    miss = math.comb(e - own, k) / math.comb(e, k)   # a given rank owns none of its experts
    payload = tokens * model.hidden * 2 * (ep - 1) * (1 - miss)
    return 2 * payload / (link_bw * COPY_H200.efficiency) * 1e3


def compare_sources(measured: "MeasuredCosts", database, tokens: Sequence[int] = (16384, 32768),
                    prompt_len: int = 8192) -> dict:
    """Per-layer ms of both sources at the fitted token counts (prompts of ``prompt_len``), and
    measured / database. ``database`` is any ``CostSource`` for the same shapes."""
    m = measured.model
    rows = []
    for t in tokens:
        chunks = [Chunk(i, prompt_len, 0) for i in range(max(1, t // prompt_len))]
        ours, theirs = measured.step(chunks, 1, [t]), database.step(chunks, 1, [t])
        row = {"tokens": t}
        for name, layers in (("attention", m.num_layers), ("moe", m.num_moe_layers)):
            a, b = getattr(ours, name) / layers, getattr(theirs, name) / layers
            row[name] = {"measured_ms_per_layer": a, "database_ms_per_layer": b,
                         "measured_over_database": a / b if b else float("nan")}
        rows.append(row)
    return {"measured": measured.name, "database": database.name, "points": rows}
