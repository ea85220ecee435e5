"""Put a plan together: the candidate deployments, their steps, a stream, a recommendation."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from tensorrt_llm_dwdp.plan.copy_model import CopyParams
from tensorrt_llm_dwdp.plan.costs import CostSource
from tensorrt_llm_dwdp.plan.deploy import DEP, DWDP, REPLICATED, Deployment, dwdp_layouts, memory_per_gpu
from tensorrt_llm_dwdp.plan.model import MoeModel
from tensorrt_llm_dwdp.plan.simulate import Context, default_requests, saturated, stream
from tensorrt_llm_dwdp.plan.system import System
from tensorrt_llm_dwdp.plan.traffic import Traffic

log = logging.getLogger(__name__)
PAYS_OFF = 0.02  # DWDP must beat the best alternative by this fraction to be recommended
TIE = 0.01       # DWDP layouts this close in throughput are told apart by memory


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked: ``gpus`` context GPUs, ``max_num_tokens`` per step; optional fixed
    DWDP layout (``dwdp_size``, ``experts_per_worker``); stream ``rate`` in requests/s."""

    gpus: int
    traffic: Traffic
    max_num_tokens: int
    dwdp_size: int | None = None
    experts_per_worker: int | None = None
    rate: float | None = None
    num_steps: int = 48
    num_requests: int = 0
    seed: int = 0


def check_request(req: PlanRequest, model: MoeModel, system: System) -> None:
    """Raise ValueError naming the first bad input."""
    if req.gpus < 1:
        raise ValueError(f"--gpus {req.gpus} must be >= 1")
    if req.max_num_tokens < 1:
        raise ValueError(f"--max-num-tokens {req.max_num_tokens} must be >= 1")
    if req.num_steps < 1 or req.num_requests < 0 or (req.rate is not None and req.rate <= 0):
        raise ValueError(f"--steps ({req.num_steps}) must be >= 1, --requests ({req.num_requests})"
                         f" >= 0 and --rate ({req.rate}) > 0")
    if req.experts_per_worker is not None and req.dwdp_size is None:
        raise ValueError("--experts-per-worker needs --dwdp-size")
    if model.max_position and req.traffic.max_len > model.max_position:
        raise ValueError(f"--isl: prompts up to {req.traffic.max_len} tokens exceed {model.name}'s "
                         f"max_position_embeddings {model.max_position}")
    if req.dwdp_size is not None:
        s = req.dwdp_size
        if s < 2 or req.gpus % s:
            raise ValueError(f"--dwdp-size {s} must be >= 2 and divide --gpus {req.gpus}")
        if s > system.nvlink_domain:
            raise ValueError(f"--dwdp-size {s} exceeds {system.name}'s NVLink domain of "
                             f"{system.nvlink_domain} GPUs")
        if req.experts_per_worker is not None:
            w, e = req.experts_per_worker, model.num_experts
            if (e - w) % (s - 1) or not 0 < (e - w) // (s - 1) <= w:
                raise ValueError(f"--experts-per-worker {w} does not divide {e} experts over "
                                 f"--dwdp-size {s}: need W + (S-1)*P = E with 1 <= P <= W")


def candidates(req: PlanRequest, model: MoeModel, system: System) -> list[Deployment]:
    """Replicated, DEP at every group size that divides the GPUs inside one NVLink domain, and
    DWDP at each such size, without and with contention_opt, for three of its valid layouts:
    the fewest owned experts, the most that still fit in memory (least copying), and the one
    halfway between (all of them are valid; ``--experts-per-worker`` plans any other). DEP
    only where S divides the experts (expert parallelism shards them evenly; DWDP does not
    need it)."""
    out = [Deployment(REPLICATED, 1)]
    sizes = [req.dwdp_size] if req.dwdp_size else \
        [s for s in range(2, req.gpus + 1) if req.gpus % s == 0 and s <= system.nvlink_domain]
    for s in sizes:
        if model.num_experts % s == 0:
            out.append(Deployment(DEP, s))
        if req.experts_per_worker is not None:
            w = req.experts_per_worker
            layouts = [(w, (model.num_experts - w) // (s - 1))]
        else:
            layouts = pick_layouts(model, system, s, req.max_num_tokens)
        for w, p in layouts:
            for opt in (False, True):
                out.append(Deployment(DWDP, s, w, p, opt))
    return out


def pick_layouts(model: MoeModel, system: System, size: int,
                 max_num_tokens: int) -> list[tuple[int, int]]:
    """The fewest-owned layout, the largest W that fits, and the fitting one halfway between."""
    valid = dwdp_layouts(model, size)
    if not valid:
        return []
    fits = [wp for wp in valid if memory_per_gpu(Deployment(DWDP, size, *wp), model, system,
                                                 max_num_tokens)["fits"]]
    chosen = [valid[0]]
    if fits:
        chosen += [fits[len(fits) // 2], fits[-1]]
    return sorted(set(chosen))


def make_plan(req: PlanRequest, model: MoeModel, system: System, costs: CostSource,
              copy: CopyParams) -> dict:
    """Every candidate's memory, saturated step breakdown and stream; the recommendation."""
    check_request(req, model, system)
    ctx = Context(model, system, costs, copy, req.max_num_tokens)
    rows = []
    for dep in candidates(req, model, system):
        mem = memory_per_gpu(dep, model, system, req.max_num_tokens)
        row = {"label": dep.label, "kind": dep.kind, "size": dep.size,
               "experts_per_worker": dep.experts_per_worker, "prefetch": dep.prefetch,
               "contention_opt": dep.contention_opt, "memory_gib": {
                   k: (v / 2**30 if isinstance(v, float) else v) for k, v in mem.items()},
               "fits": mem["fits"], "deployment": dep}
        if mem["fits"]:
            row.update(saturated(dep, req.traffic, ctx, req.num_steps, req.seed))
        log.debug("%s: %.1f GiB per GPU, fits=%s", dep.label, mem["total"] / 2**30, mem["fits"])
        rows.append(row)
    fitting = [r for r in rows if r["fits"]]
    if not fitting:
        raise ValueError(f"no deployment of {model.name} fits {system.name}'s "
                         f"{system.mem_capacity / 2**30:.0f} GiB per GPU on {req.gpus} GPUs")
    mean_len = req.traffic.mean()
    capacity = min(r["tokens_per_s_per_gpu"]["own_rate"] for r in fitting) * req.gpus / mean_len
    rate = req.rate or 0.8 * capacity
    num_requests = req.num_requests or default_requests(req.gpus)
    for r in fitting:
        r["stream"] = stream(r["deployment"], req.gpus, req.traffic, rate, num_requests, ctx,
                             req.seed)
    for r in rows:
        del r["deployment"]
    return {"rows": rows, "recommendation": recommend(fitting), "stream_rate_req_per_s": rate,
            "mean_prompt_tokens": mean_len}


def recommend(rows: list[dict]) -> dict:
    """The best DWDP row if it beats every other fitting row by PAYS_OFF, else why not. Among
    DWDP rows within TIE of the fastest, the one using the least memory per GPU is chosen."""
    def rate(r: dict) -> float:
        return r["tokens_per_s_per_gpu"]["own_rate"]

    dwdp = [r for r in rows if r["kind"] == DWDP]
    other = [r for r in rows if r["kind"] != DWDP]
    best_other = max(other, key=rate) if other else None
    if not dwdp:
        return {"choice": best_other["label"], "dwdp_pays_off": False,
                "why": "DWDP does not pay off: no DWDP layout fits in memory, or fewer than 2 "
                       "GPUs share an NVLink domain"}
    # within TIE of the fastest DWDP row, the one that leaves the most memory free wins
    top = max(rate(r) for r in dwdp)
    best = min((r for r in dwdp if rate(r) >= top * (1 - TIE)),
               key=lambda r: (r.get("memory_gib", {}).get("total", 0.0), -rate(r)))
    if best_other is None or rate(best) >= rate(best_other) * (1 + PAYS_OFF):
        gain = rate(best) / rate(best_other) - 1 if best_other else float("nan")
        return {"choice": best["label"], "dwdp_pays_off": True,
                "why": f"{gain:+.1%} prompt tokens/s per GPU over {best_other['label']}"
                if best_other else "no other deployment fits in memory (DEP also needs a "
                                   "group size that divides the experts)"}
    b = best["breakdown_ms"]
    terms = {"peer copy not hidden": b["copy_exposed"], "copy/compute interference": b["interference"]}
    worst = max(terms, key=terms.get)
    why = (f"{best['label']} reaches {rate(best):.0f} tokens/s per GPU against "
           f"{rate(best_other):.0f} for {best_other['label']}: ")
    if best_other["kind"] == DEP:
        o = best_other["breakdown_ms"]
        why += (f"DEP loses only {(o['a2a'] + o['sync_wait']) / o['step']:.1%} of its step to "
                f"all-to-all and waiting, while DWDP pays {terms[worst] / b['step']:.1%} for {worst}")
    else:
        why += (f"replicated ranks fit all experts and copy nothing, while DWDP pays "
                f"{terms[worst] / b['step']:.1%} of its step for {worst}")
    return {"choice": best_other["label"], "dwdp_pays_off": False, "why": f"DWDP does not pay off: {why}"}
