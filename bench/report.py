#!/usr/bin/env python3
"""The measured tables of README.md and docs/*.md, rendered from the JSON under bench/results/.

A document holds each table between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->``;
this script owns what lies between (a caption naming the device, the date and the JSON, then
the table) and nothing else. So a figure in the docs is the committed JSON's, and a new run
changes the docs by committing its JSON and rewriting:

    python bench/report.py --write      # render every table into its documents
    python bench/report.py --check      # exit 1 naming each table whose text differs (CI)
    python bench/report.py --show NAME  # print one table

``TABLES`` lists each table: its JSON (relative to the repository), the date of the run (the
JSON does not record it) and the function rendering it. Adding a table is one entry and one
function; a document only needs the two markers.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DOCS = ("README.md", "docs/BENCHMARKS.md", "docs/FP8.md", "docs/GRAPHS.md")
ONE_GPU = "bench/results/h200_one_gpu_2026-12-01/session4"


@dataclass(frozen=True)
class Table:
    source: str                          # JSON path (or a folder of JSON files) relative to the root
    date: str                            # the run's date (UTC), YYYY-MM-DD
    render: Callable[[dict], list[str]]  # the JSON (a folder: {file name: JSON}) -> caption tail
                                         # and table lines
    verb: str = "Measured"               # "Predicted" for model outputs, never measurements


def _x(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else f"{v:{spec}}x"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _k(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e3:.1f}K"


def _spread_k(sp: dict | None) -> str:
    if not sp:
        return "-"
    if sp["n"] < 2:
        return _k(sp["median"])
    return f"{_k(sp['median'])} [{_k(sp['min'])}-{_k(sp['max'])}]"


MODE_NAMES = {"dwdp": "DWDP", "ep": "EP", "replicated": "replicated"}


def render_serve_compare(report: dict) -> list[str]:
    """One request stream through the router, per mode: throughput, TTFT, memory, outcome."""
    from bench.serve_compare import compare

    meta = report["meta"]
    cmp_ = compare(report)
    modes = [m for m in ("dwdp", "ep", "replicated") if m in cmp_["modes"]]
    figs = cmp_["modes"]
    passes = {figs[m].get("passes", 1) for m in modes if "missed" not in figs[m]}
    lines = [f"{meta['num_prompts']} prompts ({meta['total_prompt_tokens']:,} tokens, lognormal around "
             f"{meta['median_len']} with {meta['long_frac']:.0%} at {meta['long_len']}), "
             f"{meta['load']}, {meta['ranks']} context ranks on {meta['gpus_text']}, "
             f"`{meta['moe_backend']}` MoE backend, {meta['num_moe_layers']} MoE of "
             f"{meta['num_layers']} layers; {'/'.join(str(p) for p in sorted(passes))} timed "
             f"pass(es) per mode (medians, [min-max] with more than one).", "",
             "| figure | " + " | ".join(MODE_NAMES[m] for m in modes) + " |",
             "|---|" + "---|" * len(modes)]

    def row(label: str, cell: Callable[[dict], str]) -> str:
        return f"| {label} | " + " | ".join(
            "missed" if "missed" in figs[m] else cell(figs[m]) for m in modes) + " |"

    lines += [
        row("prefill tokens/s per GPU",
            lambda f: _spread_k(f["spread"]["prefill_tokens_per_s_per_gpu"])),
        row("TTFT p50 / p99 (s)", lambda f: f"{f['ttft_p50_ms'] / 1e3:.2f} / {f['ttft_p99_ms'] / 1e3:.2f}"),
        row("expert memory per rank (GiB)",
            lambda f: ", ".join("-" if g is None else f"{g:.2f}" for g in f["expert_memory_gib_per_rank"])),
        row("requests ok / failed", lambda f: f"{f['completed']} / {f['errors']}"),
    ]
    for key, r in cmp_["ratios"].items():
        if "missed" in r:
            lines.append(f"\nDWDP / {MODE_NAMES[key[8:]]}: missed ({r['missed'][:80]}).")
            continue
        sp = r.get("spread", {}).get("throughput")
        spread = (f" [{sp['min']:.2f}-{sp['max']:.2f}{', crosses 1.0' if sp['crosses_1'] else ''}]"
                  if sp and sp["min"] != sp["max"] else "")
        lines.append(f"\nDWDP / {MODE_NAMES[key[8:]]}: throughput {_x(r['throughput'])}{spread}, "
                     f"TTFT p50 {_x(r['ttft_p50'])}, p99 {_x(r['ttft_p99'])}, "
                     f"expert memory {_x(r['expert_memory'])}.")
    return lines


def render_e2e(results: dict) -> list[str]:
    """The per-step sweep: own rate and lockstep per point, DWDP's ratios."""
    from bench.e2e_report import point_keys, point_of

    meta, modes = results["meta"], results["modes"]
    lines = [f"`{meta['preset']}` slice, {meta['num_moe_layers']} MoE of {meta['num_layers']} "
             f"layers, `{meta['moe_backend']}`, {meta['world_size']} ranks on "
             f"{meta['device_name']}{' (shared)' if meta.get('ranks_share_device') else ''}, "
             f"{meta['seq_len']}-token prompts, {meta['warmup']} warm-up + {meta['iters']} timed "
             f"steps per point. Own rate: mean of each rank's tokens / its own step time; "
             f"lockstep: all tokens / the slowest rank's step time; both per GPU.", "",
             "| point | own rate DWDP / replicated / EP (tokens/s) | DWDP / replicated | DWDP / EP "
             "| lockstep DWDP / replicated | lockstep DWDP / EP |", "|---|---|---|---|---|---|"]
    for key in point_keys(meta):
        pts = {m: point_of(modes, m, key)[0] for m in ("dwdp", "replicated", "ep")}

        def val(m: str, fig: str) -> float | None:
            return pts[m][fig] if pts[m] is not None else None

        def ratio(a: str, b: str, fig: str) -> str:
            va, vb = val(a, fig), val(b, fig)
            return "-" if va is None or not vb else f"{va / vb:.3f}"

        own = " / ".join(_k(val(m, "tokens_per_s_per_gpu")) for m in ("dwdp", "replicated", "ep"))
        lines.append(f"| {key} | {own} | {ratio('dwdp', 'replicated', 'tokens_per_s_per_gpu')} | "
                     f"{ratio('dwdp', 'ep', 'tokens_per_s_per_gpu')} | "
                     f"{ratio('dwdp', 'replicated', 'lockstep_tokens_per_s_per_gpu')} | "
                     f"{ratio('dwdp', 'ep', 'lockstep_tokens_per_s_per_gpu')} |")
    return lines


MODEL_NAMES = {"deepseek_v3": "DeepSeek-V3", "qwen3_235b_a22b": "Qwen3-235B-A22B"}


def render_kernels(bench: dict) -> list[str]:
    """CuTeDSL FC1+FC2+finalize against the bf16 and fp8 grouped GEMMs, per point."""
    lines = [f"{bench['device']}, torch {bench['torch']}; fp8 baseline: {bench['fp8_baseline']}. "
             f"Ours: NVFP4 experts ({bench['results'][0]['layout']} at load); TFLOP/s of the "
             f"useful GEMM work; TB/s of NVFP4 bytes read.", "",
             "| model | tokens/expert | ours (ms) | vs bf16 | vs fp8 | TFLOP/s | NVFP4 TB/s |",
             "|---|---|---|---|---|---|---|"]
    for r in bench["results"]:
        lines.append(f"| {MODEL_NAMES.get(r['model'], r['model'])} | {r['tokens_per_expert']} | "
                     f"{r['ours_total_ms']:.2f} | {_x(r['speedup_total'])} | "
                     f"{_x(r.get('speedup_total_fp8'))} | {r['ours_tflops']:.0f} | "
                     f"{r['ours_nvfp4_tbps']:.2f} |")
    return lines


def render_prefill_breakdown(results: dict) -> list[str]:
    """A prefill step's time by module class, one process on one GPU."""
    meta = results["meta"]
    lines = [f"`{meta['preset']}` slice ({meta['num_moe_layers']} MoE of {meta['num_layers']} layers, "
             f"{meta['experts']} NVFP4 experts, `{meta['moe_backend']}`), {meta['device_name']}, "
             f"torch {meta['torch']}; attention kernels `{meta['attention_kernels']}`. "
             f"\"attention\" is the MLA module; its fused attention call alone is \"kernel\".", "",
             "| prompts per step | tokens/s | attention (kernel) | routed experts | dense MLP | "
             "shared | rest | peak activations |", "|---|---|---|---|---|---|---|---|"]
    for p in results["points"]:
        f = p["frac"]
        size = (f"{p['prompts']} x {p['prompt_len'] // 1024}K" if not p["chunk"] else
                f"{p['prompts']} x {p['prompt_len'] // 1024}K in {p['chunk'] // 1024}K chunks")
        kernel = f"{f['attention_kernel']:.1%}"
        if p.get("attention_kernel_tflops"):
            kernel += f", {p['attention_kernel_tflops']:.0f} TFLOP/s"
        lines.append(f"| {size} | {_k(p['tokens_per_s'])} | {f['attention']:.1%} ({kernel}) | "
                     f"{f['routed_experts']:.1%} | {f['dense_mlp']:.1%} | {f['shared_expert']:.1%} | "
                     f"{f['rest']:.1%} | {p['peak_activation_gib']:.1f} GiB |")
    return lines


def render_kv_handover(bench: dict) -> list[str]:
    """KV hand-over of DeepSeek-V3's MLA cache: CUDA IPC export pool vs HTTP vs a raw copy."""
    lines = [f"{bench['gpu']}, exporter on {bench['export_device']}, puller on {bench['device']}; "
             f"median of {bench['repeats']} after an untimed first pull; end to end = until the "
             f"tensors are on the puller's device.", "",
             "| tokens (GB) | CUDA IPC pool GB/s | HTTP GB/s | IPC / HTTP | raw cudaMemcpyAsync GB/s "
             "| IPC / raw | pool mapped per pull |", "|---|---|---|---|---|---|---|"]
    for s in bench["sizes"]:
        opened = s["fast"].get("opened")
        lines.append(f"| {s['tokens']} ({s['nbytes'] / 1e9:.2f}) | {s['fast']['end_to_end_gb_per_s']:.0f} | "
                     f"{s['http']['end_to_end_gb_per_s']:.2f} | {s['fast_over_http']:.0f}x | "
                     f"{s['raw']['gb_per_s']:.0f} | {s['fast_over_raw']:.3f} | "
                     f"{'-' if opened is None else opened} |")
    return lines


def render_plan(plans: dict) -> list[str]:
    """``plan``'s committed predictions: the best DEP, DWDP as shipped, the recommendation."""
    from bench.plan_readme import table

    return ["Predictions of `python -m tensorrt_llm_dwdp plan` from aiconfigurator-core's "
            "measured operator costs, not measurements (`docs/PLANNING.md`; re-run with "
            "`python -m bench.plan_readme --write`).", "", *table(plans).splitlines()]


def _ms(stats: dict) -> str:
    return f"{stats['median']:.2f} [{stats['min']:.2f}-{stats['max']:.2f}]"


def render_graphs(results: dict) -> list[str]:
    """Host time per MoE layer beyond its kernels, eager and graphed; decode TPOT."""
    host, tpot = results["moe_host_time.json"], results["decode_tpot.json"]
    lines = [f"{host['device']}, torch {host['torch']}; `cutedsl` backend, back-to-back calls "
             f"(median [min-max] of {host['reps']} x {host['calls']}); host beyond kernels = wall "
             f"time per call minus the kernels' device time.", "",
             "| MoE layer | tokens | kernels ms | eager wall ms | host beyond kernels, eager / "
             "graphed ms | kernels vs bf16 `_grouped_mm` |", "|---|---|---|---|---|---|"]
    goals = {g["layer"]: g for g in host["goals"]}
    for layer in host["layers"]:
        c, g = layer["backends"]["cutedsl"], goals[layer["layer"]]
        lines.append(f"| {layer['experts']} x ({layer['hidden']}, {layer['inter']}) top-"
                     f"{layer['top_k']}, {layer['tokens_per_expert']} tokens/expert | "
                     f"{layer['tokens']} | {c['kernel_ms']['median']:.2f} | "
                     f"{c['eager']['wall_ms']['median']:.2f} | "
                     f"{g['eager_host_beyond_kernels_ms']:.2f} / "
                     f"{g['graphed_host_beyond_kernels_ms']:.3f} | "
                     f"{g['kernel_speedup_vs_bf16']:.2f}x |")
    lines += ["", f"Decode, `{tpot['preset']}` slice ({tpot['layers']['dense']} dense + "
              f"{tpot['layers']['moe']} MoE layers, `{tpot['moe_backend']}`), "
              f"{tpot['prompt_len']}-token prompts, {tpot['output_len']} output tokens, "
              f"{tpot['device']}: TPOT ms, median [min-max] of {tpot['reps']} runs.", "",
              "| concurrency | eager | CUDA graphs | graphs' pool MiB |", "|---|---|---|---|"]
    rows = {(r["concurrency"], r["mode"]): r for r in tpot["rows"]}
    for c in sorted({r["concurrency"] for r in tpot["rows"]}):
        e, g = rows[(c, "eager")], rows[(c, "graphed")]
        lines.append(f"| {c} | {_ms(e['tpot_ms'])} | {_ms(g['tpot_ms'])} | "
                     f"{g['graphs']['pool_mib']:.0f} |")
    return lines


def render_fp8_linears(bench: dict) -> list[str]:
    """DeepSeek-V3's projections on FP8 tensor cores (cuBLASLt blockwise 1x128 x 128x128, the
    activation quantization included) against bf16 ``F.linear``, per layer and per unit."""
    lines = [f"{bench['device']}, torch {bench['torch']}; median of {bench['repeats']} runs of "
             f"{bench['iters']} calls; FP8 = quantize the input once per unit (fused kernel) + "
             f"the blockwise-scaled GEMMs; GEMM-only leaves the quantization out.", "",
             "| tokens | dense layer bf16 / FP8 ms | ratio | MoE layer's MLA + shared linears "
             "bf16 / FP8 ms | ratio |", "|---|---|---|---|---|"]
    for tokens, t in bench["layer_totals"].items():
        d, m = t["dense_layer"], t["moe_layer_mla_shared"]
        lines.append(f"| {tokens} | {d['bf16_ms']:.2f} / {d['fp8_ms']:.2f} | {d['speedup']:.2f}x | "
                     f"{m['bf16_ms']:.2f} / {m['fp8_ms']:.2f} | {m['speedup']:.2f}x |")
    top = max(int(k) for k in bench["layer_totals"])
    lines += ["", f"Per unit at {top} tokens:", "",
              "| unit | FP8 vs bf16 | GEMM only | FP8 TFLOP/s | bf16 TFLOP/s |",
              "|---|---|---|---|---|"]
    for r in bench["results"]:
        if r["tokens"] == top:
            lines.append(f"| {r['unit']} | {r['speedup_fp8_vs_bf16']:.2f}x | "
                         f"{r['speedup_fp8_gemm_vs_bf16']:.2f}x | {r['tflops_fp8']:.0f} | "
                         f"{r['tflops_bf16']:.0f} |")
    return lines


def render_fp8_kernels(bench: dict) -> list[str]:
    """The FP8 block-128 MoE layer against torch's fp8 grouped GEMM (same run) and TensorRT-
    LLM's fp8 layers (their database, their H200), per model, routing and tokens per expert;
    "fastest" is the quickest configuration timed at the point (the default or a variant)."""
    lines = [f"{bench['device']}, torch {bench['torch']}. Ours: {bench['ours']}; torch fp8: "
             f"{bench['torch_fp8']}; TensorRT-LLM: whole layer from aiconfigurator-core's "
             f"database (their measurement on their H200; per-tensor fp8 / block-128)."
             + (f" Runs: {'; '.join(bench['sources'])}." if bench.get("sources") else ""), "",
             "| model | routing | tokens | tokens/expert | default then ms | fastest ms (config) "
             "| torch fp8 ms | fastest vs torch fp8 | TRT-LLM fp8 / block ms | fastest TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in bench["results"]:
        name, ms = min([("default", r["ours_ms"])]
                       + [(n, v["ms"]) for n, v in r.get("variants", {}).items()],
                       key=lambda item: item[1])
        trt = (f"{_num(r.get('trtllm_fp8_ms'))} / {_num(r.get('trtllm_fp8_block_ms'))}"
               if r.get("trtllm_fp8_ms") or r.get("trtllm_fp8_block_ms") else "-")
        vs = r["torch_fp8_ms"] / ms if r.get("torch_fp8_ms") else None
        tflops = r["ours_tflops"] * r["ours_ms"] / ms
        lines.append(f"| {MODEL_NAMES.get(r['model'], r['model'])} | {r['routing']} | "
                     f"{r['tokens']} | {r['tokens_per_expert']} | {r['ours_ms']:.2f} | "
                     f"{ms:.2f} ({name}) | {_num(r.get('torch_fp8_ms'))} | {_x(vs)} | {trt} | "
                     f"{tflops:.0f} |")
    return lines


TABLES: dict[str, Table] = {
    "serve-compare": Table(f"{ONE_GPU}/phase1/compare/serve/serve_compare.json", "2026-12-01",
                           render_serve_compare),
    "e2e-sweep": Table(f"{ONE_GPU}/phase1/compare/e2e/results.json", "2026-12-01", render_e2e),
    "kernels": Table("bench/results/moe_kernels_h200.json", "2026-12-01", render_kernels),
    "prefill-breakdown": Table("bench/results/prefill_breakdown_h200/prefill_breakdown.json",
                               "2026-12-01", render_prefill_breakdown),
    "kv-handover": Table(f"{ONE_GPU}/serving/kv_handover.json", "2026-12-01", render_kv_handover),
    "graphs": Table("bench/results/graphs_h100", "2026-12-07", render_graphs),
    "fp8-linears": Table("bench/results/fp8_model_h100/fp8_linears.json", "2026-12-07",
                         render_fp8_linears),
    "plan": Table("bench/results/plan", "2026-12-07", render_plan, verb="Predicted"),
    "fp8-kernels": Table("bench/results/fp8_kernels_h100_3/moe_kernels_fp8_h100.json",
                         "2026-12-08", render_fp8_kernels),
}


def _load(path: str) -> dict:
    if os.path.isdir(path):
        data = {}
        for name in sorted(os.listdir(path)):
            if name.endswith(".json"):
                with open(os.path.join(path, name)) as f:
                    data[name] = json.load(f)
        return data
    with open(path) as f:
        return json.load(f)


def render(name: str, root: str = ROOT) -> str:
    """The text between the markers of table ``name`` (caption, blank line, table)."""
    spec = TABLES[name]
    body = spec.render(_load(os.path.join(root, spec.source)))
    caption = (f"{spec.verb} {spec.date} (`{spec.source}`, rendered by `bench/report.py`). "
               f"{body[0]}")
    return "\n".join([caption, *body[1:]])


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- report:{re.escape(name)} -->\n)(.*?)(<!-- /report:{re.escape(name)} -->)",
                      re.S)


def markers(text: str) -> list[str]:
    return re.findall(r"<!-- report:([\w-]+) -->", text)


def update(text: str, root: str = ROOT) -> tuple[str, list[str]]:
    """``text`` with every table between markers re-rendered; the names that changed."""
    changed = []
    for name in markers(text):
        if name not in TABLES:
            raise ValueError(f"unknown table {name!r} (known: {', '.join(TABLES)})")
        pat = _pattern(name)
        if not pat.search(text):
            raise ValueError(f"table {name!r}: no closing <!-- /report:{name} --> after its opening")
        new = render(name, root) + "\n"
        current = pat.search(text).group(2)
        if current != new:
            changed.append(name)
            text = pat.sub(lambda m: m.group(1) + new + m.group(3), text, count=1)
    return text, changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the tables in the documents")
    mode.add_argument("--check", action="store_true", help="exit 1 if a table differs")
    mode.add_argument("--show", metavar="NAME", choices=sorted(TABLES))
    ap.add_argument("--root", default=ROOT)
    args = ap.parse_args(argv)
    if args.show:
        print(render(args.show, args.root))
        return 0
    stale = []
    for doc in DOCS:
        path = os.path.join(args.root, doc)
        with open(path) as f:
            text = f.read()
        new, changed = update(text, args.root)
        stale += [f"{doc}: {name}" for name in changed]
        if args.write and changed:
            with open(path, "w") as f:
                f.write(new)
    if args.check and stale:
        print("tables that differ from bench/results (run python bench/report.py --write):\n  "
              + "\n  ".join(stale), file=sys.stderr)
        return 1
    print(("rewrote: " + ", ".join(stale)) if args.write and stale else "tables up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
