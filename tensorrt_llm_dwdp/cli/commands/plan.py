"""plan: will DWDP pay off on this cluster and this traffic, and with which layout?

Predicts one context step and a request stream for DWDP (each valid dwdp_size / W / P, without
and with contention_opt), DEP (attention-DP + EP) and replicated data parallelism, from measured
operator costs (aiconfigurator-core's database, or our own H200 bench JSON with ``--costs
measured``). Prints a table (step terms in ms, memory per GPU, prompt tokens/s per GPU, TTFT
percentiles), optionally writes JSON (``--json``) and a plot (``--plot``), and recommends a
configuration or says why DWDP does not pay off. Everything printed is a prediction.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from tensorrt_llm_dwdp.plan.model import QUANTS

NAME = "plan"
HELP = "predict whether DWDP pays off for a model, system and traffic (no GPU needed)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="deepseek-r1-nvfp4, deepseek-v3-fp8, one of our presets (deepseek-v3), an "
                   "aiconfigurator-core bundled model (deepseek-ai/DeepSeek-V3) or a config.json path")
    p.add_argument("--system", required=True, help="gb200, h200_sxm, b200_sxm, ... "
                   "(aiconfigurator-core systems/*.yaml)")
    p.add_argument("--gpus", type=int, required=True, help="context GPUs to plan for")
    p.add_argument("--isl", required=True, help="prompt lengths: N, N1,N2,..., uniform:LO-HI or "
                   "lognormal:MEDIAN,SIGMA")
    p.add_argument("--ratio", type=float, default=1.0,
                   help="draw each prompt uniformly in [R*L, L] (default 1: exactly L)")
    p.add_argument("--max-num-tokens", type=int, required=True, help="token budget of one step")
    p.add_argument("--quant", choices=QUANTS, default=None,
                   help="expert format (default: the model name's, else nvfp4 where the system "
                   "has FP4 tensor cores and fp8 elsewhere)")
    p.add_argument("--dwdp-size", type=int, default=None, help="only this DWDP/DEP group size "
                   "(default: every size that divides --gpus inside one NVLink domain)")
    p.add_argument("--experts-per-worker", type=int, default=None,
                   help="only this W (with --dwdp-size); P = (E - W) / (S - 1)")
    p.add_argument("--costs", choices=["aic", "measured"], default="aic",
                   help="operator costs: aiconfigurator-core's database (default) or our measured "
                   "H200 JSON (h200_sxm, DeepSeek-V3 shapes)")
    p.add_argument("--framework", default="trtllm", help="aiconfigurator-core framework database "
                   "(trtllm, sglang, vllm)")
    p.add_argument("--rate", type=float, default=None,
                   help="stream arrivals in requests/s (default: 80%% of the slowest fitting "
                   "deployment's capacity)")
    p.add_argument("--steps", type=int, default=48, help="sampled saturated steps per deployment "
                   "(the step breakdown and tokens/s columns)")
    p.add_argument("--requests", type=int, default=0, help="requests in the stream (default: "
                   "500 per GPU, 2000 to 8000; the first tenth is left out of the TTFT percentiles)")
    p.add_argument("--seed", type=int, default=0, help="random seed of prompt lengths and arrivals")
    p.add_argument("--json", default=None, metavar="PATH", help="write the plan as JSON")
    p.add_argument("--plot", default=None, metavar="PATH", help="draw the plan (PNG)")


def main(args: argparse.Namespace) -> int:
    from tensorrt_llm_dwdp.plan.build import build_plan
    from tensorrt_llm_dwdp.plan.report import blog_comparison, plot, table

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # aiconfigurator-core logs every engine compile at INFO and warns about lanes it does
        # not use for this query; what matters reaches the plan's own flag/dropped lines
        logging.getLogger("aiconfigurator_core").setLevel(logging.ERROR)

    plan = build_plan(model=args.model, system=args.system, gpus=args.gpus, isl=args.isl,
                      ratio=args.ratio, max_num_tokens=args.max_num_tokens, quant=args.quant,
                      dwdp_size=args.dwdp_size, experts_per_worker=args.experts_per_worker,
                      costs=args.costs, framework=args.framework, rate=args.rate,
                      steps=args.steps, requests=args.requests, seed=args.seed)
    print(f"plan (PREDICTION): {plan['title']}")
    print(f"operator costs: {plan['costs']['name']}")
    print(f"copy model: efficiency {plan['copy']['efficiency']:.3f} of NVLink, interference "
          f"{plan['copy']['interference']:.3f} ({plan['copy']['source']})")
    for note in plan["notes"]["extrapolated"]:
        print(f"flag: {note}")
    for d in plan["notes"]["dropped"]:
        print(f"dropped (breaks the roofline): {d['op']} EP{d['ep']} at {d['tokens']} tokens, "
              f"{d['latency_us']:.0f} us per layer implies {d['implied_hbm_tbps']:.2f} TB/s of "
              f"HBM (peak {d['peak_hbm_tbps']:.2f}) and {d['implied_tflops']:.0f} TFLOP/s (peak "
              f"{d['peak_tflops']:.0f}); the roofline floor {d['replaced_by_roofline_us']:.0f} us "
              f"is used")
    if plan.get("sources_compared"):
        sc = plan["sources_compared"]
        print(f"sources compared, ms per layer, {sc['measured']} / {sc['database']}:")
        for row in sc["points"]:
            print(f"  {row['tokens']:>6} tokens: " + ", ".join(
                f"{k} {row[k]['measured_ms_per_layer']:.2f} / {row[k]['database_ms_per_layer']:.2f}"
                f" = {row[k]['measured_over_database']:.2f}x" for k in ("attention", "moe")))
    print(table(plan))
    print(f"stream: {plan['stream_rate_req_per_s']:.2f} requests/s (Poisson), mean prompt "
          f"{plan['mean_prompt_tokens']:.0f} tokens; steps in a stream are smaller than saturated "
          f"ones (tok/stp), so TTFT follows the small-step times, where DWDP's peer copy may not "
          f"hide: compare busy, not the saturated step")
    over = [r["label"] for r in plan["rows"] if r["fits"] and r["stream"]["overloaded"]]
    if over:
        print(f"overloaded at this rate (queue grows; TTFT depends on --requests, lower --rate): "
              f"{', '.join(over)}")
    if plan.get("blog19"):
        print("beside TensorRT-LLM blog 19 (GB200, DeepSeek-R1 NVFP4, ISL 8K ratio 0.8):")
        print(blog_comparison(plan, plan["blog19"]))
    rec = plan["recommendation"]
    print(f"recommendation: {rec['choice']} - {rec['why']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan, f, indent=1, default=str)
    if args.plot:
        plot(plan, args.plot)
    sys.stdout.flush()
    return 0
