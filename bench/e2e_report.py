"""Turn the ranks' gathered records into the results JSON's aggregates, goals and summary.md.

Two throughput figures per point, both per GPU:
- own rate: the mean of each rank's tokens / its own step time. Right when every rank always
  has work queued (a DWDP or replicated rank that finishes early starts its next step).
- lockstep: the ranks' tokens over the SLOWEST rank's step time. Right when a step's requests
  leave together, and what EP is by construction (its all-to-all makes ranks wait).
Goals are reported, never asserted, and they can fail: a point that errored, was skipped (time
budget) or whose mode did not build counts as missed, and memory is the allocator's reading.
Ranks sharing a device must have run their timed steps at the same time: a point where they did
not (``not_comparable``, from each step's start and end on the host clock) gives no ratio and
counts as missed in the goals.
"""
from __future__ import annotations

from typing import Any

MiB = 2 ** 20
MEMORY_TOLERANCE = 0.03   # measured may differ from the layout's bytes by 3% + the resolution
RESOLVE_FACTOR = 16       # a figure below 16x the reading's resolution is not judged
OVERLAP_MIN = 0.8         # ranks sharing a device: the best-covered rank's steps overlapped >= 80%


def aggregate_point(records: list[dict[str, Any]], shared_device: bool = False) -> dict[str, Any]:
    """Per-point figures over the ranks: ``tokens_per_s_per_gpu`` (own rate) and
    ``lockstep_tokens_per_s_per_gpu`` (module docstring); an error on any rank makes the
    point an error. ``steps_overlap_per_rank``: each rank's share of its timed step time during
    which another rank was in a timed step (from ``step_spans``); ``steps_overlap`` the
    largest. With ``shared_device`` (the ranks time-slice one GPU, or CPU cores) a point whose
    ``steps_overlap`` is under ``OVERLAP_MIN`` is marked ``not_comparable``: some rank had the
    device to itself, so its step time is not that of the mode with every rank working and
    no ratio is drawn from it."""
    from bench.overlap import overlap_fractions

    ok = [r for r in records if "error" not in r]
    if len(ok) != len(records):
        return {"ranks": records, "error": "; ".join(r["error"] for r in records if "error" in r)}
    slowest = max(r["step_ms_mean"] for r in ok)
    out = {
        "ranks": records,
        "tokens_per_s_per_gpu": sum(r["tokens_per_s"] for r in ok) / len(ok),
        "lockstep_tokens_per_s_per_gpu": sum(r["tokens"] for r in ok) / (slowest / 1e3) / len(ok),
        "step_ms_per_rank": [r["step_ms_mean"] for r in ok],
    }
    if len(ok) > 1 and all("step_spans" in r for r in ok):
        fractions = overlap_fractions([[tuple(sp) for sp in r["step_spans"]] for r in ok])
        out["steps_overlap_per_rank"] = fractions
        out["steps_overlap"] = max((f for f in fractions if f is not None), default=0.0)
        if shared_device and out["steps_overlap"] < OVERLAP_MIN:
            out["not_comparable"] = (
                f"the ranks' timed steps overlapped {out['steps_overlap']:.0%} of the best-covered "
                f"rank's step time on a device they share (< {OVERLAP_MIN:.0%})")
    if "ep_wait_ms_per_step" in ok[0]:
        out["ep_collective_ms_per_rank"] = [r["ep_wait_ms_per_step"] for r in ok]
        # The counts exchange moves a few bytes: its time is almost all waiting for the peer.
        out["ep_counts_ms_per_rank"] = [r["ep_collective_ms_per_step"]["ep_counts"] for r in ok]
    if "dwdp_stall_ms_per_step" in ok[0]:
        out["dwdp_stall_ms_per_step_per_rank"] = [r["dwdp_stall_ms_per_step"] for r in ok]
        out["dwdp_copy_ms_per_layer_per_rank"] = [r["dwdp_copy_ms_per_layer"] for r in ok]
    return out


def point_keys(meta: dict[str, Any]) -> list[str]:
    """Every point the run planned, ``imbalance/tokens``, in table order."""
    return [f"{imb}/{t}" for imb in meta["imbalance"] for t in meta["tokens"]]


def point_of(modes: dict[str, Any], mode: str, key: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(point, None)`` when ``mode`` measured ``key``; ``(None, why)`` when it did not."""
    m = modes.get(mode)
    if m is None:
        return None, f"{mode} did not run"
    p = m.get("points", {}).get(key)
    if p is None:
        return None, f"{mode}: {m['error']}" if "error" in m else f"{mode} {key} did not run"
    if "skipped" in p:
        return None, f"{mode} {key} skipped ({p['skipped']})"
    if "error" in p:
        return None, f"{mode} {key} failed ({p['error']})"
    return p, None


def _pair(modes: dict, a: str, b: str, key: str) -> tuple[tuple[dict, dict] | None, str | None]:
    """Both modes' points at ``key``, or why they give no ratio: one did not measure it, or
    one's ranks did not run at the same time on a device they share (``not_comparable``)."""
    pa, why_a = point_of(modes, a, key)
    pb, why_b = point_of(modes, b, key)
    if pa is None or pb is None:
        return None, "; ".join(w for w in (why_a, why_b) if w)
    apart = [f"{m} {key}: {p['not_comparable']}" for m, p in ((a, pa), (b, pb)) if "not_comparable" in p]
    if apart:
        return None, "not comparable: " + "; ".join(apart)
    return (pa, pb), None


def _needs(meta: dict, *modes: str) -> str | None:
    absent = [m for m in modes if m not in meta["modes"]]
    return f"not evaluated: this run has no {' / '.join(absent)} mode" if absent else None


def _ratio_goal(results: dict, a: str, b: str, imbalance: str, figure: str) -> dict[str, Any]:
    """``a / b`` of ``figure`` at every planned ``imbalance`` point; met when all were measured
    and ``a`` is ahead at each."""
    meta, modes = results["meta"], results["modes"]
    absent = _needs(meta, a, b)
    if absent:
        return {"points": [], "met": None, "note": absent}
    points = []
    for key in [k for k in point_keys(meta) if k.startswith(imbalance + "/")]:
        pair, why = _pair(modes, a, b, key)
        if pair is None:
            points.append({"point": key, "missed": why})
            continue
        ratio = pair[0][figure] / pair[1][figure]
        points.append({"point": key, "ratio": ratio, "ahead": ratio > 1.0})
    met = bool(points) and all(p.get("ahead") for p in points)
    return {"points": points, "met": met, "figure": figure}


def _near_replicated(results: dict, num_moe_layers: int) -> dict[str, Any]:
    meta, modes = results["meta"], results["modes"]
    note = "judged on points whose step time per MoE layer (replicated) >= copy time per layer (DWDP)"
    absent = _needs(meta, "dwdp", "replicated")
    if absent:
        return {"points": [], "met": None, "note": absent}
    points = []
    for key in [k for k in point_keys(meta) if k.startswith("equal/")]:
        pair, why = _pair(modes, "dwdp", "replicated", key)
        if pair is None:
            points.append({"point": key, "missed": why})
            continue
        dw, rep = pair
        compute = rep["step_ms_per_rank"][0] / num_moe_layers
        copy = dw.get("dwdp_copy_ms_per_layer_per_rank", [0.0])[0]
        ratio = dw["tokens_per_s_per_gpu"] / rep["tokens_per_s_per_gpu"]
        points.append({"point": key, "dwdp_over_replicated": ratio, "step_ms_per_layer": compute,
                       "copy_ms_per_layer": copy, "compute_exceeds_copy": compute >= copy,
                       "within_5pct": ratio >= 0.95})
    qualifying = [p for p in points if p.get("compute_exceeds_copy")]
    met = (bool(qualifying) and not any("missed" in p for p in points)
           and all(p["within_5pct"] for p in qualifying))
    return {"points": points, "met": met, "note": note}


def memory_goal(results: dict) -> dict[str, Any]:
    """Each mode's measured expert bytes per rank (allocator / RSS reading after loading minus
    before, minus a model without experts) against the layout's bytes: met when every mode
    built, every figure is large enough to resolve, and each is within tolerance."""
    meta, modes = results["meta"], results["modes"]
    resolution = meta.get("memory_resolution_bytes", 0)
    out: dict[str, Any] = {}
    for mode in meta["modes"]:
        m = modes.get(mode)
        if m is None or "memory" not in m:
            out[mode] = {"missed": (m or {}).get("error", f"{mode} did not run")}
            continue
        measured = m["memory"]["measured_expert_bytes_per_rank"]
        predicted = m["memory"]["predicted_expert_bytes_per_rank"]
        resolved = all(p >= RESOLVE_FACTOR * resolution for p in predicted)
        within = all(abs(a - b) <= MEMORY_TOLERANCE * b + resolution
                     for a, b in zip(measured, predicted))
        out[mode] = {"measured_mib": [b / MiB for b in measured],
                     "predicted_mib": [b / MiB for b in predicted],
                     "resolved": resolved, "as_predicted": resolved and within}
    rep = out.get("replicated", {}).get("measured_mib")
    if rep:
        for v in out.values():
            if "measured_mib" in v:
                v["over_replicated"] = [a / b if b else None for a, b in zip(v["measured_mib"], rep)]
    met = bool(out) and all(v.get("as_predicted") for v in out.values())
    return {"modes": out, "met": met, "source": _memory_source(modes),
            "resolution_bytes": resolution,
            "note": f"measured within {MEMORY_TOLERANCE:.0%} + resolution of the layout's bytes; "
                    f"figures under {RESOLVE_FACTOR}x the resolution are not judged (not met)"}


def _memory_source(modes: dict) -> str | None:
    return next((m["memory"]["source"] for m in modes.values() if "memory" in m), None)


def goals(results: dict[str, Any], num_moe_layers: int) -> dict[str, Any]:
    """Issue 6's goals with both throughput figures, evaluated (not asserted) on what ran."""
    return {
        "dwdp_within_5pct_of_replicated": _near_replicated(results, num_moe_layers),
        "dwdp_ahead_of_ep_under_4x_own_rate": _ratio_goal(results, "dwdp", "ep", "4x",
                                                          "tokens_per_s_per_gpu"),
        "dwdp_ahead_of_ep_under_4x_lockstep": _ratio_goal(results, "dwdp", "ep", "4x",
                                                          "lockstep_tokens_per_s_per_gpu"),
        "memory_as_layout_predicts": memory_goal(results),
    }


def routed_tflops(meta: dict[str, Any], tokens_per_s: float) -> float:
    """Routed-expert TFLOP/s at ``tokens_per_s``: 2 * 3 * H * I * top_k per token per MoE layer."""
    per_token = 6.0 * meta["hidden_size"] * meta["moe_intermediate_size"] * meta["top_k"]
    return tokens_per_s * per_token * meta["num_moe_layers"] / 1e12


def _fmt(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def _verdict(goal: dict) -> str:
    return {True: "met", False: "not met", None: "not evaluated"}[goal["met"]]


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _ratio_cell(modes: dict, a: str, b: str, key: str, figure: str) -> str:
    """``a / b`` of ``figure`` at ``key``; "not overlapped" where either point is
    ``not_comparable``, "-" where either is missing."""
    pair, why = _pair(modes, a, b, key)
    if pair is None:
        return "not overlapped" if why and why.startswith("not comparable") else "-"
    return _fmt(_div(pair[0][figure], pair[1][figure]), ".3f")


def summary_markdown(results: dict[str, Any]) -> str:
    meta, modes, g = results["meta"], results["modes"], results["goals"]
    names = list(meta["modes"])
    peak = meta.get("peak")
    lines = [
        "# End-to-end prefill: DWDP vs replicated DP vs attention-DP + EP",
        "",
        f"Model: `{meta['preset']}` slice, {meta['num_moe_layers']} MoE layers ({meta['num_layers']} "
        f"layers), H={meta['hidden_size']}, E={meta['num_experts']}, top-{meta['top_k']}, NVFP4 experts. "
        f"{meta['world_size']} ranks on {meta['device_name']}; MoE backend `{meta['moe_backend']}`; "
        f"sequences of {meta['seq_len']} tokens; {meta['warmup']} warm-up + {meta['iters']} timed steps.",
        "",
        "Own rate: mean of each rank's tokens / its own step time (a rank always has work queued). "
        "Lockstep: all ranks' tokens / the slowest rank's step time (a step's requests leave "
        "together; EP is lockstep by construction). Both per GPU.",
    ]
    for title, figure in (("own rate", "tokens_per_s_per_gpu"),
                          ("lockstep", "lockstep_tokens_per_s_per_gpu")):
        lines += ["", f"## Prefill tokens/s per GPU, {title}", "",
                  "| point | " + " | ".join(names) + " | DWDP / replicated | DWDP / EP |",
                  "|---|" + "---|" * (len(names) + 2)]
        for key in point_keys(meta):
            cells = []
            for m in names:
                p, _ = point_of(modes, m, key)
                cells.append("missed" if p is None else
                             _fmt(p[figure]) + (" *" if "not_comparable" in p else ""))
            lines.append(f"| {key} | " + " | ".join(cells)
                         + f" | {_ratio_cell(modes, 'dwdp', 'replicated', key, figure)} | "
                         f"{_ratio_cell(modes, 'dwdp', 'ep', key, figure)} |")
    apart = [f"{m} {k}" for k in point_keys(meta) for m in names
             if "not_comparable" in (point_of(modes, m, k)[0] or {})]
    if apart:
        lines += ["", f"\\* the ranks' timed steps did not overlap (< {OVERLAP_MIN:.0%} of the "
                  f"best-covered rank's step time) on a device they share: each rank had it to itself "
                  f"for part of its steps, so no ratio is drawn ({', '.join(apart)})."]
    lines += ["", "## Step latency per rank (ms), DWDP stall and EP collective time per step (ms)", "",
              "| point | mode | step ms per rank | steps overlapped per rank | DWDP stall / step | "
              "DWDP copy / layer | EP in collectives (in counts exchange) | routed TFLOP/s (% of peak) |",
              "|---|---|---|---|---|---|---|---|"]
    for key in point_keys(meta):
        for mode in names:
            p, _ = point_of(modes, mode, key)
            if p is None:
                continue
            tf = routed_tflops(meta, p["tokens_per_s_per_gpu"])
            pct = f" ({100 * tf / peak['bf16_tflops']:.1f}%)" if peak else " (no peak known)"
            lines.append(
                f"| {key} | {mode} | {', '.join(f'{v:.1f}' for v in p['step_ms_per_rank'])} | "
                f"{', '.join(_fmt(v, '.2f') for v in p.get('steps_overlap_per_rank', [])) or '-'} | "
                f"{', '.join(f'{v:.2f}' for v in p.get('dwdp_stall_ms_per_step_per_rank', [])) or '-'} | "
                f"{', '.join(f'{v:.2f}' for v in p.get('dwdp_copy_ms_per_layer_per_rank', [])) or '-'} | "
                f"{', '.join(f'{v:.1f} ({c:.1f})' for v, c in zip(p.get('ep_collective_ms_per_rank', []), p.get('ep_counts_ms_per_rank', []))) or '-'} | "
                f"{tf:.1f}{pct} |")
    mem = g["memory_as_layout_predicts"]
    lines += ["", f"## Routed-expert memory per GPU (MiB), measured ({mem['source']}: in use after "
              "loading minus before, minus the model without experts; DWDP includes its prefetch "
              "buffers, EP the buffers of a CUDA IPC / shm exchange)", "", "| mode | measured per rank | layout predicts | measured / replicated |",
              "|---|---|---|---|"]
    for mode, v in mem["modes"].items():
        if "missed" in v:
            lines.append(f"| {mode} | missed: {v['missed']} | - | - |")
            continue
        lines.append(f"| {mode} | {', '.join(f'{x:.1f}' for x in v['measured_mib'])} | "
                     f"{', '.join(f'{x:.1f}' for x in v['predicted_mib'])} | "
                     f"{', '.join(_fmt(x, '.3f') for x in v.get('over_replicated', []))} |")
    agree = results.get("agreement", {})
    lines += ["", "## Outputs", "",
              f"- DWDP logits bitwise equal to replicated: {agree.get('dwdp_equals_replicated')}",
              f"- EP logits vs replicated, max |diff| / max |ref|: {_fmt(agree.get('ep_rel_err'), '.2e')}",
              "", "## Goals (reported, not asserted; a missed point fails its goal)", ""]
    n = g["dwdp_within_5pct_of_replicated"]
    lines.append(f"- DWDP within 5% of replicated once compute per layer exceeds copy time: "
                 f"**{_verdict(n)}** (" + ", ".join(_point_text(p, "dwdp_over_replicated") for p in n["points"]) + ")")
    for key, title in (("dwdp_ahead_of_ep_under_4x_own_rate", "own rate"),
                       ("dwdp_ahead_of_ep_under_4x_lockstep", "lockstep")):
        i = g[key]
        lines.append(f"- DWDP ahead of EP under 4x imbalance, {title}: **{_verdict(i)}** ("
                     + ", ".join(_point_text(p, "ratio") for p in i["points"]) + ")")
    lines.append(f"- Memory per GPU as the layout predicts (measured): **{_verdict(mem)}**")
    if results.get("skipped"):
        lines += ["", "Skipped (counted as missed): " + "; ".join(results["skipped"])]
    return "\n".join(lines) + "\n"


def _point_text(p: dict, field: str) -> str:
    if "missed" in p:
        return f"{p['point']}: " + ("not overlapped" if p["missed"].startswith("not comparable")
                                    else "missed")
    suffix = "" if p.get("compute_exceeds_copy", True) else " (copy-bound)"
    return f"{p['point']}: x{p[field]:.3f}{suffix}"
