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


def table() -> str:
    """One Markdown row per fitting deployment of each committed prediction."""
    lines = ["| prediction | deployment | GiB/GPU | step ms | of which copy not hidden + "
             "interference | tokens/s/GPU | vs DEP | TTFT p50 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for name in CASES:
        with open(os.path.join(OUT, f"{name}.json")) as f:
            plan = json.load(f)
        rows = [r for r in plan["rows"] if r["fits"]]
        dep = max((r for r in rows if r["kind"] == "dep"),
                  key=lambda r: r["tokens_per_s_per_gpu"]["own_rate"])
        base = dep["tokens_per_s_per_gpu"]["own_rate"]
        title = (f"{plan['inputs']['model']}, {plan['inputs']['gpus']}x {plan['inputs']['system']}, "
                 f"ISL {plan['inputs']['isl']} ratio {plan['inputs']['ratio']}, "
                 f"max_num_tokens {plan['inputs']['max_num_tokens']}")
        for r in rows:
            b, rate = r["breakdown_ms"], r["tokens_per_s_per_gpu"]["own_rate"]
            lines.append(f"| {title} | {r['label']} | {r['memory_gib']['total']:.0f} | "
                         f"{b['step']:.0f} | {b['copy_exposed'] + b['interference']:.0f} | "
                         f"{rate:.0f} | {rate / base:.2f}x | {r['stream']['ttft_ms']['p50']:.0f} |")
        lines.append(f"| {title} | recommendation | {plan['recommendation']['choice']} | | | | | |")
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
