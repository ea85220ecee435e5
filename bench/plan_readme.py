"""The README's plan predictions: run them into bench/results/plan/*.json, render the table.

``python -m bench.plan_readme --write`` re-runs the three predictions (CPU, seconds);
``python -m bench.plan_readme`` prints the Markdown table from the committed JSON, so the
README's figures cannot drift from what ``plan`` wrote.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

from bench.json_out import emit
from tensorrt_llm_dwdp.plan.build import build_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench/results/plan")
CASES = {
    "deepseek-r1-nvfp4_gb200_s4": dict(model="deepseek-r1-nvfp4", system="gb200", gpus=8,
                                       dwdp_size=4, isl="8192", ratio=0.8, max_num_tokens=32768),
    "deepseek-r1-nvfp4_gb200_s8": dict(model="deepseek-r1-nvfp4", system="gb200", gpus=8,
                                       dwdp_size=8, isl="8192", ratio=0.8, max_num_tokens=32768),
    "deepseek-v3-fp8_h200x8": dict(model="deepseek-v3-fp8", system="h200_sxm", gpus=8,
                                   isl="8192", ratio=0.8, max_num_tokens=16384),
}


def write() -> None:
    for name, kw in CASES.items():
        plan = build_plan(**kw)
        plan.pop("elapsed_s")
        emit(plan, os.path.join(OUT, f"{name}.json"), quiet=True)


def load_plans(folder: str = OUT) -> dict[str, dict]:
    """The committed predictions, by case name."""
    plans = {}
    for name in CASES:
        with open(os.path.join(folder, f"{name}.json")) as f:
            plans[name] = json.load(f)
    return plans


def table(plans: dict[str, dict] | None = None) -> str:
    """Per committed prediction: its best DEP, DWDP's fewest-owned layout as shipped (no
    contention_opt) and the recommended deployment."""
    plans = load_plans() if plans is None else plans
    lines = ["| prediction (not a measurement) | deployment | GiB/GPU | step ms | copy not hidden"
             " + interference ms | prompt tokens/s/GPU | vs DEP | TTFT p50 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for name in CASES:
        plan = plans[f"{name}.json"] if f"{name}.json" in plans else plans[name]
        rows = [r for r in plan["rows"] if r["fits"]]
        by_label = {r["label"]: r for r in rows}
        dep = max((r for r in rows if r["kind"] == "dep"),
                  key=lambda r: r["tokens_per_s_per_gpu"]["own_rate"])
        shipped = min((r for r in rows if r["kind"] == "dwdp" and not r["contention_opt"]),
                      key=lambda r: (r["size"], r["experts_per_worker"]))
        chosen = by_label[plan["recommendation"]["choice"]]
        base = dep["tokens_per_s_per_gpu"]["own_rate"]
        inp = plan["inputs"]
        size = f", S = {inp['dwdp_size']}" if inp.get("dwdp_size") else ""
        title = (f"{inp['model']} on {inp['gpus']}x {inp['system']}{size}, ISL {inp['isl']} "
                 f"ratio {inp['ratio']}, {inp['max_num_tokens']} tokens/step")
        for r in dict.fromkeys(x["label"] for x in (dep, shipped, chosen)):
            r = by_label[r]
            b, rate = r["breakdown_ms"], r["tokens_per_s_per_gpu"]["own_rate"]
            mark = " (recommended)" if r is chosen else ""
            lines.append(f"| {title} | {r['label']}{mark} | {r['memory_gib']['total']:.0f} | "
                         f"{b['step']:.0f} | {b['copy_exposed'] + b['interference']:.0f} | "
                         f"{rate:.0f} | {rate / base:.2f}x | {r['stream']['ttft_ms']['p50']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="re-run the predictions first")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.write:
        write()
    print(table())


if __name__ == "__main__":
    main()
