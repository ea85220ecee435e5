"""From command-line values to a finished plan (what ``plan`` and the bench scripts call)."""
from __future__ import annotations

import copy
import dataclasses
import time

from tensorrt_llm_dwdp.plan.costs import AicCosts, CostSource
from tensorrt_llm_dwdp.moe.specs import NVFP4
from tensorrt_llm_dwdp.plan.model import FP8, KNOWN_MODELS, MoeModel, resolve_model
from tensorrt_llm_dwdp.plan.planner import PlanRequest, make_plan
from tensorrt_llm_dwdp.plan.reference import BLOG19, COPY_H200
from tensorrt_llm_dwdp.plan.system import System, load_system
from tensorrt_llm_dwdp.plan.traffic import parse_isl

FP8_CHECKPOINT = "deepseek-ai/DeepSeek-V3"  # the database side of the H200 comparison
BLOG19_MODELS = ("deepseek-r1-nvfp4", "deepseek-ai/DeepSeek-R1", "deepseek-ai--DeepSeek-R1")


def build_plan(*, model: str, system: str, gpus: int, isl: str, max_num_tokens: int,
               ratio: float = 1.0, quant: str | None = None, dwdp_size: int | None = None,
               experts_per_worker: int | None = None, costs: str = "aic",
               framework: str = "trtllm", rate: float | None = None, steps: int = 48,
               requests: int = 0, seed: int = 0) -> dict:
    """The plan as a JSON-ready dict (see ``planner.make_plan``) with its inputs and sources."""
    t0 = time.perf_counter()
    traffic = parse_isl(isl, ratio)
    spec = load_system(system)
    moe = resolve_model(model, quant or default_quant(model, spec, costs))
    req = PlanRequest(gpus=gpus, traffic=traffic, max_num_tokens=max_num_tokens,
                      dwdp_size=dwdp_size, experts_per_worker=experts_per_worker, rate=rate,
                      num_steps=steps, num_requests=requests, seed=seed)
    source: CostSource
    if costs == "measured":
        from tensorrt_llm_dwdp.plan.measured import MeasuredCosts
        source = MeasuredCosts.from_breakdown(moe, spec)
    else:
        source = AicCosts(moe, spec, framework)
    plan = make_plan(req, moe, spec, source, COPY_H200)
    notes = copy.deepcopy(source.notes)  # the comparison's queries are not the plan's
    compared = _compare(moe, spec, source)
    source.notes = notes
    if compared:
        plan["sources_compared"] = compared
    plan["title"] = (f"{moe.name} ({moe.quant}) on {gpus}x {system}, ISL {isl} ratio {ratio}, "
                     f"max_num_tokens {max_num_tokens}")
    plan["inputs"] = {"model": model, "system": system, "gpus": gpus, "isl": isl, "ratio": ratio,
                      "max_num_tokens": max_num_tokens, "quant": moe.quant, "costs": costs,
                      "dwdp_size": dwdp_size, "experts_per_worker": experts_per_worker,
                      "seed": seed, "steps": steps}
    plan["model"] = dataclasses.asdict(moe) | {"expert_bytes": moe.expert_bytes}
    plan["costs"] = {"name": source.name, **source.describe()}
    plan["copy"] = dataclasses.asdict(COPY_H200)
    plan["notes"] = {"extrapolated": source.notes.messages(),
                     "dropped": source.notes.dropped}
    if system == "gb200" and moe.quant == "nvfp4" and model in BLOG19_MODELS and \
            (isl, ratio, max_num_tokens) == ("8192", 0.8, 32768) and any(
                r["label"] in ("DEP4", "DWDP4 W64 P64") and r["fits"] for r in plan["rows"]):
        plan["blog19"] = BLOG19
    plan["prediction"] = True
    plan["elapsed_s"] = time.perf_counter() - t0
    return plan


def default_quant(model: str, system: System, costs: str = "aic") -> str | None:
    """The expert format when ``--quant`` is not given: the model name's (None lets
    ``resolve_model`` take it), else nvfp4 where the system has FP4 tensor cores, fp8 elsewhere
    (a bf16 checkpoint on H100/H200 is served in FP8, not refused). Our measured costs are
    NVFP4 experts on bf16 tensor cores, so ``costs="measured"`` keeps nvfp4."""
    if model in KNOWN_MODELS or costs == "measured":
        return None
    return NVFP4 if system.flops.get("fp4") else FP8


def _compare(model: MoeModel, system: System, source: CostSource) -> dict | None:
    """Our measured H200 costs beside the database's where both cover the model: DeepSeek-V3
    expert shapes on h200_sxm. The database has no FP4 compute on H200, so its side is the
    same shapes in FP8 block scaling (TensorRT-LLM's H200 path, DeepSeek-V3's own FP8
    checkpoint, whose attention module includes the projections as our measurement does);
    ours is NVFP4 weights on bf16 tensor cores."""
    from tensorrt_llm_dwdp.plan.measured import SHAPE, MeasuredCosts
    if system.name != "h200_sxm" or model.aic_id is None or any(
            getattr(model, k) != v for k, v in SHAPE.items() if k != "quant"):
        return None
    measured = source if isinstance(source, MeasuredCosts) else \
        MeasuredCosts.from_breakdown(dataclasses.replace(model, quant="nvfp4"), system)
    database = source if isinstance(source, AicCosts) and model.quant == FP8 else \
        AicCosts(dataclasses.replace(model, quant=FP8, aic_id=FP8_CHECKPOINT), system)
    from tensorrt_llm_dwdp.plan.measured import compare_sources
    return compare_sources(measured, database)
