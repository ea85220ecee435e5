#!/usr/bin/env python3
"""One request stream through the router to a context group in each mode, on the same GPUs.

For each mode a real disaggregated deployment starts (``serve.cluster.LocalCluster``: S context
servers as one group, one generation server, the router), takes warm-up requests and the stream
once untimed (``--warmup-stream``: every shape a step meets is built before the timed pass, in
every mode alike; one H200 run without it showed the first mode's early steps 3-4x slower), then
the SAME request stream timed, and stops before the next mode starts:

- ``dwdp``: the context servers are one DWDP group (``dwdp_config``: W = P = E/S), each rank runs
  its own requests with no collective;
- ``ep``: attention-DP + expert-parallel context servers (``ep_config``): E/S experts per rank,
  tokens to their owners by all-to-all, ranks in lockstep (an idle rank joins with an empty batch);
- ``replicated``: independent context servers, each holding every expert.

Requests are completions of ``max_tokens=1``: the router answers from the context server, so
each request is one prefill and its time to first token (TTFT) the prefill latency as a client
sees it (queueing included). Prompt lengths come from a long-tailed distribution: lognormal
around ``--median-len`` tokens (``--sigma``) with a ``--long-frac`` share at ``--long-len``;
load is a closed loop (``--concurrency``) or Poisson arrivals (``--request-rate``).

Per mode: total prefill tokens/s per GPU (prompt tokens of completed requests / wall time of
the stream / GPUs holding the ranks), TTFT p50/p99, each rank's expert memory as it measured it
(allocator or RSS, ``/metrics`` ``expert_memory_bytes``), the prompt tokens each rank took, and
from each server's step log (``/engine/steps``, the stream's steps only) what each rank did:
steps (an EP rank's idle joins apart), tokens per step, busy seconds (wall and CUDA-event) and
busy / the stream's wall time, kernels JIT-compiled inside steps (a warning beside every figure
of the mode: the warm-up missed them), and how much the ranks' steps overlapped, with prefill
tokens per busy second of steps that ran alone and beside another rank's (``step_figures``):
on one GPU shared by the ranks, that is what contention costs.
One pass of one stream is one sample: on a shared GPU three passes gave DWDP/EP 0.47, 1.06 and
1.14. So each deployment sends the stream ``--repeats`` times (default 5) after its warm-up, and
``--rounds`` starts each mode again with the modes' order rotated (interleaved, so drift over the
call falls on every mode). Figures are medians with [min-max]; a ratio is of medians with the
range of one mode's extremes against the other's, and a range crossing 1.0 is said in the JSON
(``spread_crosses_1``) and the summary: those runs do not show which mode is faster.
Writes ``serve_compare.json``, ``summary.md`` and ``serve_compare.png`` under ``--out``.

    python bench/serve_compare.py --model CKPT --ranks 2 --out $OUT/compare --moe-backend cutedsl
    python bench/serve_compare.py --smoke --out /tmp/compare          # CPU, tiny preset, seconds
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import signal
import statistics
import sys
import time
import urllib.request
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import serve_load  # noqa: E402

logger = logging.getLogger("serve_compare")
MODES = ("dwdp", "ep", "replicated")
MOE_BACKEND_YAML = {"torch": "VANILLA", "cutedsl": "CUTEDSL"}


# ----------------------------------------------------------------------------- the stream
def sample_lengths(n: int, *, median: int, sigma: float, long_len: int, long_frac: float,
                   min_len: int, max_len: int, seed: int) -> list[int]:
    """``n`` prompt lengths: lognormal around ``median`` (log-sd ``sigma``), clipped to
    ``[min_len, max_len]``, with ``round(n * long_frac)`` of them (spread through the stream)
    set to ``long_len``. Deterministic in ``seed``."""
    if not 1 <= min_len <= median <= max_len or long_len > max_len or not 0 <= long_frac <= 1:
        raise ValueError(f"lengths: need 1 <= min_len {min_len} <= median {median} <= max_len "
                         f"{max_len}, long_len {long_len} <= max_len, 0 <= long_frac {long_frac} <= 1")
    rng = random.Random(seed)
    out = [min(max_len, max(min_len, round(rng.lognormvariate(math.log(median), sigma))))
           for _ in range(n)]
    n_long = round(n * long_frac)
    for i in rng.sample(range(n), n_long):
        out[i] = long_len
    return out


def make_specs(lengths: list[int], vocab: int, seed: int) -> list[serve_load.RequestSpec]:
    """One completion per length: random token ids in [3, vocab), one output token."""
    rng = random.Random(seed)
    return [serve_load.RequestSpec(n, 1, [rng.randrange(3, vocab) for _ in range(n)]) for n in lengths]


# ----------------------------------------------------------------------------- the modes
def mode_options(mode: str, ranks: int, num_experts: int, args: argparse.Namespace) -> dict[str, Any]:
    """The context servers' LLM-API options in ``mode``."""
    opts: dict[str, Any] = {"max_batch_size": args.max_batch_size, "max_num_tokens": args.max_num_tokens,
                            "max_seq_len": args.max_seq_len,
                            "moe_config": {"backend": MOE_BACKEND_YAML[args.moe_backend]}}
    if args.device:
        opts["device"] = args.device
    if mode == "dwdp":
        opts["dwdp_config"] = {"dwdp_size": ranks, "num_experts_per_worker": num_experts // ranks,
                               "num_prefetch_experts": num_experts // ranks}
    elif mode == "ep":
        opts["ep_config"] = {"ep_size": ranks, "transport": args.ep_transport}
    elif mode != "replicated":
        raise ValueError(f"mode {mode!r}; choose from {MODES}")
    return opts


def scrape(url: str, timeout_s: float = 30.0) -> dict[str, float]:
    """``/metrics`` of one server as ``{metric name without prefix and labels: value}``."""
    from tensorrt_llm_dwdp.serve.metrics import PREFIX

    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout_s) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0]
        if name.startswith(PREFIX):
            name = name[len(PREFIX):]
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def fetch_steps(url: str, after: int = -1, timeout_s: float = 30.0) -> dict[str, Any]:
    """``GET /engine/steps?after=N`` of one server: ``{"step_count", "steps": [StepRecord]}``."""
    with urllib.request.urlopen(f"{url.rstrip('/')}/engine/steps?after={after}", timeout=timeout_s) as resp:
        return json.loads(resp.read().decode())


# Tokens-per-step buckets (upper bounds): small steps are where a JIT backend picks new kernels.
STEP_TOKEN_BOUNDS = (512, 1024, 2048, 4096, 8192, 16384, 32768)


def _intervals(records: list[dict[str, Any]]) -> list[tuple[float, float]]:
    return [(r["start"], r["start"] + r["wall_s"]) for r in records]


def step_figures(per_rank: list[list[dict[str, Any]]], duration_s: float) -> list[dict[str, Any]]:
    """Each rank's steps during the stream (``StepRecord`` dicts from ``/engine/steps``), summed:
    steps by kind; tokens per prefill step (min / p50 / mean / max and counts per bucket);
    busy seconds (every step's wall time, an EP rank's idle joins included), device seconds
    (CUDA events, None on CPUs) and busy / the stream's wall time; kernels compiled inside
    steps; ``overlap``: the share of the rank's busy time during which another rank was in a
    step too (on a GPU the ranks share, the time they contend for it); prefill tokens per
    busy second of steps that ran mostly alone (< half of the step overlapped) and mostly
    overlapped: on a shared, time-sliced GPU the second is about half the first, on GPUs of
    their own about equal."""
    from bench.overlap import overlap_per_step

    out = []
    for recs, covered in zip(per_rank, overlap_per_step([_intervals(recs) for recs in per_rank])):
        prefill = [r for r in recs if r["kind"] == "prefill"]
        tokens = sorted(r["tokens"] for r in prefill)
        busy = sum(r["wall_s"] for r in recs)
        devices = [r["device_s"] for r in recs]
        solo = [(r, c) for r, c in zip(recs, covered) if r["kind"] == "prefill" and c < r["wall_s"] / 2]
        shared = [(r, c) for r, c in zip(recs, covered) if r["kind"] == "prefill" and c >= r["wall_s"] / 2]
        buckets: dict[str, int] = {}
        for t in tokens:
            bound = next((b for b in STEP_TOKEN_BOUNDS if t <= b), None)
            key = f"<={bound}" if bound else f">{STEP_TOKEN_BOUNDS[-1]}"
            buckets[key] = buckets.get(key, 0) + 1
        out.append({
            "steps": {k: sum(1 for r in recs if r["kind"] == k) for k in ("prefill", "decode", "idle")},
            "tokens_per_step": ({"min": tokens[0], "p50": tokens[len(tokens) // 2],
                                 "mean": sum(tokens) / len(tokens), "max": tokens[-1]} if tokens else None),
            "tokens_per_step_counts": buckets,
            "prefill_tokens": sum(tokens),
            "busy_s": busy,
            "device_s": None if not recs or None in devices else sum(devices),
            "busy_fraction": busy / duration_s if duration_s else None,
            "kernel_compiles": sum(r.get("compiles", 0) for r in recs),
            "kernel_compile_s": sum(r.get("compile_s", 0.0) for r in recs),
            "overlap": sum(covered) / busy if busy else None,
            "solo_prefill_tokens_per_s": _rate(r for r, _ in solo),
            "overlapped_prefill_tokens_per_s": _rate(r for r, _ in shared),
            "solo_prefill_steps": len(solo), "overlapped_prefill_steps": len(shared),
        })
    return out


def _rate(records) -> float | None:
    recs = list(records)
    seconds = sum(r["wall_s"] for r in recs)
    return sum(r["tokens"] for r in recs) / seconds if seconds else None


def load_args(args: argparse.Namespace, url: str) -> argparse.Namespace:
    """``serve_load``'s arguments for one run against ``url`` (streaming, greedy)."""
    return serve_load.parse_args(["--url", url, "--timeout", str(args.request_timeout),
                                  "--label", "serve_compare"])


def run_mode(mode: str, args: argparse.Namespace, specs: list, warm: list, num_experts: int,
             round_index: int = 0) -> dict[str, Any]:
    """Start ``mode``'s deployment, warm it up, send the stream ``args.repeats`` times timed,
    read its metrics, stop it. The first pass's full record, with every pass's headline figures
    under ``passes``."""
    from tensorrt_llm_dwdp.serve.cluster import LocalCluster

    cluster = LocalCluster(args.model, os.path.join(args.workdir, f"{mode}-{round_index}"),
                           num_ctx=args.ranks, num_gen=1,
                           ctx_options=mode_options(mode, args.ranks, num_experts, args),
                           gen_options={"device": "cpu", "max_seq_len": args.max_seq_len,
                                        "max_num_tokens": args.max_num_tokens},
                           launcher=args.launcher, gen_model=args.gen_model)
    t0 = time.perf_counter()
    try:
        cluster.start(timeout_s=args.start_timeout)
    except Exception as exc:   # e.g. out of memory at load: the mode is missed, the rest run
        logger.error("%s: the deployment did not start: %s", mode, exc)
        return {"error": f"start failed: {type(exc).__name__}: {str(exc)[-1500:]}"}
    try:
        start_s = time.perf_counter() - t0
        la = load_args(args, cluster.router_url)
        if warm:
            asyncio.run(serve_load.run_load(la, warm, rate=math.inf, concurrency=len(warm), seed=args.seed))
        if args.warmup_stream:
            # The stream once, untimed: attention builds a plan (and cuDNN may JIT a kernel) per
            # new shape on first use, and the driver keeps JIT results on disk, so without this
            # the first mode pays what the later ones reuse.
            asyncio.run(serve_load.run_load(la, specs, rate=args.request_rate,
                                            concurrency=args.concurrency, seed=args.seed))
        runs = [_timed_pass(cluster, la, specs, args) for _ in range(args.repeats)]
        first = runs[0]
        first["start_s"] = start_s
        first["passes"] = [_pass_figures(r, round_index) for r in runs]
        return first
    finally:
        cluster.stop()


def _timed_pass(cluster, la: argparse.Namespace, specs: list, args: argparse.Namespace) -> dict[str, Any]:
    """One timed pass of the stream: the load summary with the ranks' metrics and step logs."""
    before = [scrape(u) for u in cluster.context_urls]
    marks = [fetch_steps(u, after=1 << 62)["step_count"] - 1 for u in cluster.context_urls]
    results, duration = asyncio.run(serve_load.run_load(
        la, specs, rate=args.request_rate, concurrency=args.concurrency, seed=args.seed))
    after = [scrape(u) for u in cluster.context_urls]
    logged = [fetch_steps(u, after=m) for u, m in zip(cluster.context_urls, marks)]
    summary = serve_load.summarize(la, results, duration, rate=args.request_rate,
                                   concurrency=args.concurrency)
    summary["expert_memory_bytes_per_rank"] = [m.get("expert_memory_bytes") for m in after]
    summary["prefill_tokens_per_rank"] = [a.get("engine_prefill_tokens", 0) - b.get("engine_prefill_tokens", 0)
                                          for a, b in zip(after, before)]
    summary["prefill_busy_s_per_rank"] = [a.get("engine_prefill_seconds", 0) - b.get("engine_prefill_seconds", 0)
                                          for a, b in zip(after, before)]
    records = [entry["steps"] for entry in logged]
    summary["step_records_complete"] = all(
        entry["step_count"] - 1 - m == len(recs) for entry, m, recs in zip(logged, marks, records))
    summary["steps_per_rank"] = step_figures(records, duration)
    summary["step_records_per_rank"] = records
    return summary


def _pass_figures(run: dict[str, Any], round_index: int) -> dict[str, Any]:
    ttft = run.get("ttft_ms") or {}
    steps = run.get("steps_per_rank") or []
    return {"round": round_index, "input_tokens_per_s": run["input_tokens_per_s"],
            "ttft_p50_ms": ttft.get("p50"), "ttft_p99_ms": ttft.get("p99"),
            "completed": run["completed"], "errors": run["errors"],
            "kernel_compiles": sum(r["kernel_compiles"] for r in steps)}


def merge_rounds(previous: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """One mode's record over rounds: the first round's full record, every round's passes; a
    round that failed makes the mode failed (its error kept)."""
    if previous is None:
        return new
    if "error" in previous:
        return previous
    if "error" in new:
        return {**previous, "error": new["error"]}
    return {**previous, "passes": previous.get("passes", []) + new.get("passes", [])}


# ----------------------------------------------------------------------------- the report
def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _passes(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Every timed pass's headline figures (a record without ``passes`` is one pass)."""
    if run.get("passes"):
        return run["passes"]
    ttft = run.get("ttft_ms") or {}
    return [{"round": 0, "input_tokens_per_s": run["input_tokens_per_s"],
             "ttft_p50_ms": ttft.get("p50"), "ttft_p99_ms": ttft.get("p99"),
             "completed": run["completed"], "errors": run["errors"], "kernel_compiles": 0}]


def _spread(values: list[float | None]) -> dict[str, Any] | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": vals[0], "max": vals[-1], "n": len(vals)}


def _mode_figures(run: dict[str, Any], gpus: int) -> dict[str, Any]:
    """The headline figures of one mode: medians over its timed passes, with their spread
    (None where the run has none)."""
    if "error" in run:
        return {"missed": run["error"][:300]}
    passes = _passes(run)
    mem = run.get("expert_memory_bytes_per_rank") or []
    spread = {"prefill_tokens_per_s_per_gpu": _spread([p["input_tokens_per_s"] / gpus for p in passes]),
              "ttft_p50_ms": _spread([p["ttft_p50_ms"] for p in passes]),
              "ttft_p99_ms": _spread([p["ttft_p99_ms"] for p in passes])}
    med = {k: (v["median"] if v else None) for k, v in spread.items()}
    errors = sum(p["errors"] for p in passes)
    figures = {
        "prefill_tokens_per_s_per_gpu": med["prefill_tokens_per_s_per_gpu"],
        "prefill_tokens_per_s": med["prefill_tokens_per_s_per_gpu"] * gpus,
        "ttft_p50_ms": med["ttft_p50_ms"], "ttft_p99_ms": med["ttft_p99_ms"],
        "passes": len(passes), "spread": spread,
        "per_pass_prefill_tokens_per_s_per_gpu": [p["input_tokens_per_s"] / gpus for p in passes],
        "expert_memory_gib_per_rank": [m / 2**30 if m is not None else None for m in mem],
        "completed": run["completed"], "errors": errors,
    }
    if errors:
        samples = run.get("error_samples")
        figures["missed"] = f"{errors} request(s) failed over {len(passes)} pass(es): {samples}"
    steps = run.get("steps_per_rank")
    compiles = sum(r["kernel_compiles"] for r in steps or []) + sum(
        p.get("kernel_compiles", 0) for p in passes[1:])
    if steps:
        figures["busy_fraction_per_rank"] = [r["busy_fraction"] for r in steps]
        figures["overlap_per_rank"] = [r["overlap"] for r in steps]
    if compiles:   # a measurement flaw, not the mode's speed: said beside every figure
        compile_s = sum(r["kernel_compile_s"] for r in steps or [])
        figures["warnings"] = [
            f"{compiles} kernel(s) JIT-compiled inside the timed stream "
            f"({compile_s:.1f} s of the first pass's steps): the warm-up did not "
            f"compile everything the stream used"]
    return figures


def ratio_spread(ours: list[float], theirs: list[float], higher_is_better: bool = True
                 ) -> dict[str, Any] | None:
    """The ratio of medians and its range over the passes (ours' extremes against theirs'), and
    whether that range crosses 1.0: then the runs do not say which mode is faster."""
    if not ours or not theirs or min(theirs) <= 0 or min(ours) <= 0:
        return None
    lo, hi = min(ours) / max(theirs), max(ours) / min(theirs)
    out = {"ratio": statistics.median(ours) / statistics.median(theirs), "min": lo, "max": hi,
           "crosses_1": lo < 1.0 < hi}
    if out["crosses_1"]:
        better = "faster" if higher_is_better else "lower"
        out["note"] = (f"the spread ({lo:.3f}-{hi:.3f}) crosses 1.0: these runs do not show "
                       f"which mode is {better}")
    return out


def compare(report: dict[str, Any]) -> dict[str, Any]:
    """Per-mode figures and DWDP's ratios against EP and replicated; a mode that did not run,
    failed to start, or lost a request makes every comparison it is in missed."""
    gpus = report["meta"]["gpus"]
    figs = {m: _mode_figures(r, gpus) for m, r in report["modes"].items()}
    out: dict[str, Any] = {"modes": figs, "ratios": {}}
    for other in ("ep", "replicated"):
        d, o = figs.get("dwdp", {"missed": "not run"}), figs.get(other, {"missed": "not run"})
        if "missed" in d or "missed" in o:
            out["ratios"][f"dwdp_vs_{other}"] = {"missed": d.get("missed") or o.get("missed")}
            continue
        warnings = d.get("warnings", []) + o.get("warnings", [])
        dp, op_ = _passes(report["modes"]["dwdp"]), _passes(report["modes"][other])
        spread = {
            "throughput": ratio_spread(d["per_pass_prefill_tokens_per_s_per_gpu"],
                                       o["per_pass_prefill_tokens_per_s_per_gpu"]),
            "ttft_p50": ratio_spread([p["ttft_p50_ms"] for p in dp if p["ttft_p50_ms"]],
                                     [p["ttft_p50_ms"] for p in op_ if p["ttft_p50_ms"]], False),
            "ttft_p99": ratio_spread([p["ttft_p99_ms"] for p in dp if p["ttft_p99_ms"]],
                                     [p["ttft_p99_ms"] for p in op_ if p["ttft_p99_ms"]], False)}
        notes = [f"{k}: {v['note']}" for k, v in spread.items() if v and v.get("note")]
        out["ratios"][f"dwdp_vs_{other}"] = {
            **({"warnings": warnings} if warnings else {}),
            "throughput": _ratio(d["prefill_tokens_per_s_per_gpu"], o["prefill_tokens_per_s_per_gpu"]),
            "ttft_p50": _ratio(d["ttft_p50_ms"], o["ttft_p50_ms"]),
            "ttft_p99": _ratio(d["ttft_p99_ms"], o["ttft_p99_ms"]),
            "expert_memory": _ratio(max(d["expert_memory_gib_per_rank"] or [0]),
                                    max(o["expert_memory_gib_per_rank"] or [0])),
            "spread": spread,
            **({"spread_crosses_1": notes} if notes else {}),
        }
    return out


def summary_markdown(report: dict[str, Any]) -> str:
    meta, cmp_ = report["meta"], report["comparison"]
    lines = [
        "# One request stream, three context-group modes",
        "",
        f"Model `{meta['model_name']}` (H={meta['hidden_size']}, E={meta['num_experts']}, "
        f"top-{meta['top_k']}, {meta['num_moe_layers']} MoE of {meta['num_layers']} layers), "
        f"{meta['ranks']} context ranks on {meta['gpus_text']}, MoE backend `{meta['moe_backend']}`. "
        f"{meta['num_prompts']} requests, prompt lengths lognormal around {meta['median_len']} "
        f"(sigma {meta['sigma']}), {meta['long_frac']:.0%} at {meta['long_len']} "
        f"({meta['total_prompt_tokens']} tokens); load: {meta['load']}; one output token each."
        + (f" Warm-up: {meta['warmup']} requests" if "warmup" in meta else "")
        + (", then the stream once untimed." if meta.get("warmup_stream") else
           "." if "warmup" in meta else ""),
        "",
        "Prefill tokens/s per GPU: prompt tokens of completed requests / the stream's wall time / "
        "GPUs holding the ranks. TTFT: request sent to first token at the client (queueing "
        "included). Expert memory: each rank's own reading after loading (allocator or RSS), "
        "minus before, minus the model without experts; DWDP includes its prefetch buffers, EP "
        "its exchange buffers.",
        "",
        "Each figure is the median over the timed passes, [min-max] beside it; a ratio is of "
        "medians, its range the extremes of one mode against the other's.",
        "",
        "| mode | passes | prefill tok/s per GPU | TTFT p50 (ms) | TTFT p99 (ms) | expert GiB per rank | prompt tokens per rank | requests ok / failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, f in cmp_["modes"].items():
        run = report["modes"][mode]
        if "completed" not in f:
            lines.append(f"| {mode} | | missed: {f['missed'][:120]} | | | | | |")
            continue
        mem = ", ".join("-" if m is None else f"{m:.2f}" for m in f["expert_memory_gib_per_rank"])
        toks = ", ".join(f"{t:.0f}" for t in run.get("prefill_tokens_per_rank", []))
        sp = f["spread"]
        lines.append(f"| {mode} | {f['passes']} | {_med(sp['prefill_tokens_per_s_per_gpu'])} | "
                     f"{_med(sp['ttft_p50_ms'])} | {_med(sp['ttft_p99_ms'])} | {mem} | {toks} | "
                     f"{f['completed']} / {f['errors']} |")
    lines += ["", "| DWDP against | throughput | TTFT p50 | TTFT p99 | expert memory |", "|---|---|---|---|---|"]
    for key, r in cmp_["ratios"].items():
        if "missed" in r:
            lines.append(f"| {key[8:]} | missed: {r['missed'][:100]} | | | |")
            continue
        flag = " (see warnings)" if r.get("warnings") else ""
        sp = r.get("spread", {})
        lines.append(f"| {key[8:]} | {_ratio_text(r['throughput'], sp.get('throughput'))}{flag} | "
                     f"{_ratio_text(r['ttft_p50'], sp.get('ttft_p50'))} | "
                     f"{_ratio_text(r['ttft_p99'], sp.get('ttft_p99'))} | x{_fmt(r['expert_memory'], '.3f')} |")
        for note in r.get("spread_crosses_1", []):
            lines.append(f"\n**{key[8:]}: {note}.**")
    lines += _steps_markdown(report)
    return "\n".join(lines) + "\n"


def _steps_markdown(report: dict[str, Any]) -> list[str]:
    """The per-rank step table (``step_figures``) and any warnings."""
    rows = [(mode, i, r) for mode, run in report["modes"].items()
            for i, r in enumerate(run.get("steps_per_rank") or [])]
    if not rows:
        return []
    lines = ["", "Steps during the stream, per rank (`/engine/steps`). Busy: the steps' wall time "
             "(EP: idle joins included); device: CUDA-event time over the same steps (it counts "
             "other processes' slices on a shared GPU too, so it does not separate contention); "
             "overlap: share of the busy time another rank was also in a step; solo / overlapped: "
             "prefill tokens per busy second in steps less / more than half overlapped.", "",
             "| mode | rank | prefill steps (idle) | tokens per step min / p50 / max | busy s (device s) "
             "| busy / wall | overlap | solo / overlapped tok/s | kernels compiled (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, i, r in rows:
        tps = r["tokens_per_step"] or {}
        dev = "" if r["device_s"] is None else f" ({r['device_s']:.2f})"
        lines.append(
            f"| {mode} | {i} | {r['steps']['prefill']} ({r['steps']['idle']}) | "
            f"{tps.get('min', '-')} / {tps.get('p50', '-')} / {tps.get('max', '-')} | "
            f"{r['busy_s']:.2f}{dev} | {_fmt(r['busy_fraction'], '.2f')} | {_fmt(r['overlap'], '.2f')} | "
            f"{_fmt(r['solo_prefill_tokens_per_s'])} / {_fmt(r['overlapped_prefill_tokens_per_s'])} | "
            f"{r['kernel_compiles']} ({r['kernel_compile_s']:.1f}) |")
    for mode, f in report["comparison"]["modes"].items():
        for w in f.get("warnings", []):
            lines.append(f"\n**{mode}: {w}.**")
    return lines


def _fmt(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def _med(sp: dict[str, Any] | None, spec: str = ".0f") -> str:
    """``median [min-max]``, or the median alone for one pass."""
    if not sp:
        return "-"
    if sp["n"] < 2:
        return format(sp["median"], spec)
    return f"{sp['median']:{spec}} [{sp['min']:{spec}}-{sp['max']:{spec}}]"


def _ratio_text(value: float | None, sp: dict[str, Any] | None) -> str:
    text = f"x{_fmt(value, '.3f')}"
    if sp and sp["min"] != sp["max"]:
        text += f" [{sp['min']:.3f}-{sp['max']:.3f}]" + (" crosses 1" if sp["crosses_1"] else "")
    return text


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder (make-checkpoint); not with --smoke")
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke run: a tiny-deepseek-v3 checkpoint written under --out, short prompts")
    p.add_argument("--ranks", type=int, default=2, help="context servers (ranks) per mode")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--median-len", type=int, default=8192)
    p.add_argument("--sigma", type=float, default=0.6, help="log-sd of the lognormal lengths")
    p.add_argument("--long-len", type=int, default=32768)
    p.add_argument("--long-frac", type=float, default=0.1)
    p.add_argument("--min-len", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=None, help="closed loop: requests open at once")
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second")
    p.add_argument("--warmup", type=int, default=None, help="warm-up requests (default 2 per rank)")
    p.add_argument("--warmup-stream", action=argparse.BooleanOptionalAction, default=True,
                   help="send the stream once untimed before the timed one (default: on)")
    p.add_argument("--max-num-tokens", type=int, default=8192, help="context servers' step token budget")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=None, help="default: the longest prompt + 8")
    p.add_argument("--moe-backend", choices=sorted(MOE_BACKEND_YAML), default="torch")
    p.add_argument("--device", default=None, help="context servers' device (cpu, cuda; default auto)")
    p.add_argument("--ep-transport", default="auto")
    p.add_argument("--gen-model", default=None,
                   help="checkpoint the (unused) generation server loads on the CPU; default --model")
    p.add_argument("--launcher", default="auto", choices=["auto", "mpirun", "tcp"])
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--request-timeout", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5,
                   help="timed passes of the stream per deployment start (default 5)")
    p.add_argument("--rounds", type=int, default=1,
                   help="starts of each mode, the modes' order rotated each round (interleaved)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.rounds < 1:
        p.error(f"--repeats and --rounds must be >= 1, got {args.repeats} and {args.rounds}")
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"--modes: unknown {bad}; choose from {list(MODES)}")
    if args.smoke:
        args.device = args.device or "cpu"
        for key, value in (("num_prompts", 6), ("median_len", 24), ("long_len", 96), ("min_len", 4),
                           ("long_frac", 0.2), ("max_num_tokens", 64), ("max_batch_size", 4),
                           ("repeats", 2)):
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
        args.concurrency = args.concurrency or 4
    elif not args.model:
        p.error("--model is required (or --smoke)")
    if args.concurrency is None and not math.isfinite(args.request_rate):
        args.concurrency = 2 * args.ranks * args.max_batch_size
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM (the device script's timeout) unwinds through the finally blocks, so the
    # deployment running now is stopped rather than left holding the GPU.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.makedirs(args.out, exist_ok=True)
    args.workdir = os.path.join(args.out, "work")
    from tensorrt_llm_dwdp.model.checkpoint import read_config

    if args.smoke:
        from tensorrt_llm_dwdp.model.presets import get_preset
        from tensorrt_llm_dwdp.model.synthetic import write_synthetic_checkpoint

        args.model = os.path.join(args.workdir, "tiny-ckpt")
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            write_synthetic_checkpoint(args.model, get_preset("tiny-deepseek-v3", num_layers=3),
                                       quant="nvfp4", seed=1)
    config, quant = read_config(args.model)
    lengths = sample_lengths(args.num_prompts, median=args.median_len, sigma=args.sigma,
                             long_len=args.long_len, long_frac=args.long_frac, min_len=args.min_len,
                             max_len=args.long_len, seed=args.seed)
    args.max_seq_len = args.max_seq_len or max(lengths) + 8
    specs = make_specs(lengths, config.vocab_size, args.seed)
    n_warm = 2 * args.ranks if args.warmup is None else args.warmup
    warm = make_specs([min(args.median_len, args.max_num_tokens)] * n_warm, config.vocab_size, args.seed + 1)
    gpus, gpus_text = _gpus(args)
    report: dict[str, Any] = {"meta": {
        "model": args.model, "model_name": os.path.basename(args.model.rstrip("/")),
        "hidden_size": config.hidden_size, "num_experts": config.num_experts, "top_k": config.top_k,
        "num_layers": config.num_layers, "num_moe_layers": len(config.moe_layer_indices),
        "expert_quant": quant, "ranks": args.ranks, "gpus": gpus, "gpus_text": gpus_text,
        "moe_backend": args.moe_backend, "ep_transport": args.ep_transport,
        "num_prompts": args.num_prompts, "median_len": args.median_len, "sigma": args.sigma,
        "long_len": args.long_len, "long_frac": args.long_frac, "lengths": lengths,
        "total_prompt_tokens": sum(lengths), "max_num_tokens": args.max_num_tokens,
        "max_batch_size": args.max_batch_size, "warmup": n_warm, "warmup_stream": args.warmup_stream,
        "load": (f"closed loop, concurrency {args.concurrency}" if args.concurrency and
                 not math.isfinite(args.request_rate) else
                 f"Poisson {args.request_rate}/s" + (f", at most {args.concurrency} open" if args.concurrency else "")),
    }, "modes": {}}
    report["meta"].update(repeats=args.repeats, rounds=args.rounds)
    for rnd in range(args.rounds):
        # interleaved: each round starts with the next mode, so drift over the call (clocks,
        # caches, neighbours) falls on every mode alike
        order = args.modes[rnd % len(args.modes):] + args.modes[:rnd % len(args.modes)]
        for mode in order:
            logger.info("round %d, mode %s: starting %d context ranks", rnd, mode, args.ranks)
            run = run_mode(mode, args, specs, warm, config.num_experts, rnd)
            report["modes"][mode] = merge_rounds(report["modes"].get(mode), run)
            report["modes"] = {m: report["modes"][m] for m in args.modes if m in report["modes"]}
            report["comparison"] = compare(report)
            write_outputs(report, args.out)   # what ran so far survives a later failure
    print(summary_markdown(report))
    failed = [m for m, f in report["comparison"]["modes"].items() if "missed" in f]
    return 1 if failed else 0


def _gpus(args: argparse.Namespace) -> tuple[int, str]:
    """How many GPUs hold the context ranks (CPU ranks count as one device each)."""
    if args.device == "cpu":
        return args.ranks, f"{args.ranks} CPU processes"
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        return args.ranks, f"{args.ranks} CPU processes"
    used = min(n, args.ranks)
    name = torch.cuda.get_device_name(0)
    shared = " (ranks share GPUs)" if used < args.ranks else ""
    return used, f"{used}x {name}{shared}"


def write_outputs(report: dict[str, Any], out: str) -> None:
    with open(os.path.join(out, "serve_compare.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(summary_markdown(report))
    try:
        from bench.plots import plot_serve_compare

        plot_serve_compare(report, os.path.join(out, "serve_compare.png"))
    except ImportError as exc:
        logger.warning("no plot: %s", exc)


if __name__ == "__main__":
    sys.exit(main())
