#!/usr/bin/env python3
"""Where a prefill step's time goes: one process, one GPU, the e2e benchmark's model slice.

The slice is ``bench/e2e_model.py``'s replicated DeepSeek-V3 model (real hidden / MLA / expert
sizes, the preset's 3 dense layers + ``--num-moe-layers`` MoE layers, NVFP4 experts, the
``cutedsl`` MoE backend by default). Each point prefills a set of prompts; the step time is
split by module class with CUDA events around every module (forward hooks):

- ``attention``: the MLA modules (projections, rotary, cache write and the fused attention;
  the fused kernel alone is also reported as ``attention_kernel``, with its useful TFLOP/s);
- ``routed_experts``: ``ConfigurableMoE`` (router, permutation, grouped GEMMs, finalize);
- ``shared_expert`` and ``dense_mlp``: the MLPs of the MoE and the dense layers;
- ``rest``: the step minus those (embedding, norms, residuals, lm_head, step metadata).

A point ``LxN`` is N prompts of L tokens in one step; ``LxN/C`` prefills them in chunks of up
to C tokens over several steps (a chunk attends to its cached prefix). It also times decode
attention for a batch of sequences: in the latent space (kv_b_proj absorbed, the default)
against up-projecting the cached latent per sequence. Writes ``prefill_breakdown.json`` and
``prefill_breakdown.png`` (stacked bars) under ``--out``; checks the issue's goals.

With ``--quant fp8`` the dense linears (MLA projections, dense MLP, shared expert) are FP8
block 128 as in DeepSeek-V3's FP8 checkpoint (``Fp8Linear``), the routed experts unchanged:
the same split shows what the FP8 tensor cores take off ``attention``, ``dense_mlp`` and
``shared_expert``.

    python bench/prefill_breakdown.py --out bench/results/prefill_breakdown_h200
    python bench/prefill_breakdown.py --quant fp8 --out bench/results/prefill_breakdown_fp8_h200
    python bench/prefill_breakdown.py --out /tmp/pb --device cpu --preset tiny-deepseek-v3 \\
        --moe-backend torch --num-moe-layers 2 --vocab-size 512 --points 32x2,64x1/16 --decode 16
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.e2e_model import bench_config, build_bench_model  # noqa: E402
from tensorrt_llm_dwdp.engine.attention import (  # noqa: E402
    CausalAttention, DecodeAttention, Kernels, StepMetadata, merge_by_lse, select_kernels,
)
from tensorrt_llm_dwdp.model.batch import BatchInfo  # noqa: E402
from tensorrt_llm_dwdp.model.layers import MLP  # noqa: E402
from tensorrt_llm_dwdp.model.moe_block import MoeBlock  # noqa: E402

logger = logging.getLogger("prefill_breakdown")
PARTS = ("attention", "routed_experts", "shared_expert", "dense_mlp")
GOALS = {"attention_frac_max": 0.20, "tokens_per_s_min": 30_000, "long_tokens_per_s_min": 18_000}


@dataclass(frozen=True)
class Point:
    """``count`` prompts of ``length`` tokens, prefilled in steps of up to ``chunk`` tokens."""

    length: int
    count: int
    chunk: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Point":
        body, _, chunk = text.partition("/")
        length, _, count = body.lower().partition("x")
        return cls(int(length), int(count or 1), int(chunk) if chunk else None)

    @property
    def name(self) -> str:
        return f"{self.length}x{self.count}" + (f"/{self.chunk}" if self.chunk else "")

    def steps(self) -> list[BatchInfo]:
        """The prefill steps: all prompts in one step, or each prompt's chunks in turn."""
        if self.chunk is None:
            return [BatchInfo.prefill([self.length] * self.count)]
        out = []
        for slot in range(self.count):
            for start in range(0, self.length, self.chunk):
                out.append(BatchInfo((slot,), (start,), (min(self.chunk, self.length - start),)))
        return out


class ModuleTimer:
    """Events around every module of each part (CUDA events on a GPU, wall clock on the CPU,
    where modules run synchronously). ``mark()`` closes a step; ``totals()`` sums per step."""

    def __init__(self, parts: dict[str, list[torch.nn.Module]], device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.steps: list[dict[str, list]] = []
        self.handles = []
        for part, modules in parts.items():
            for m in modules:
                self.handles.append(m.register_forward_pre_hook(self._hook(part, 0)))
                self.handles.append(m.register_forward_hook(self._hook(part, 1)))

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _hook(self, part: str, end: int):
        def hook(module, *args):
            if self.steps:
                self.steps[-1].setdefault(part, []).append(self._now())
        return hook

    def mark(self) -> None:
        self.steps.append({"": [self._now()]})

    def totals(self) -> list[dict[str, float]]:
        """Per step: milliseconds of each part and of the whole step (key ``step``)."""
        if self.cuda:
            torch.cuda.synchronize()
        out = []
        for cur, nxt in zip(self.steps, self.steps[1:]):
            rec = {"step": self._ms(cur[""][0], nxt[""][0])}
            for part, evs in cur.items():
                if part:
                    rec[part] = sum(self._ms(a, b) for a, b in zip(evs[::2], evs[1::2]))
            out.append(rec)
        return out

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def reset(self) -> None:
        self.steps = []

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def module_parts(model) -> dict[str, list[torch.nn.Module]]:
    parts: dict[str, list[torch.nn.Module]] = {p: [] for p in (*PARTS, "attention_kernel")}
    for layer in model.model.layers:
        parts["attention"].append(layer.self_attn)
        parts["attention_kernel"] += [m for m in layer.self_attn.modules()
                                      if isinstance(m, (CausalAttention, DecodeAttention))]
        if isinstance(layer.mlp, MoeBlock):
            parts["routed_experts"].append(layer.mlp.experts)
            if layer.mlp.shared_experts is not None:
                parts["shared_expert"].append(layer.mlp.shared_experts)
        elif isinstance(layer.mlp, MLP):
            parts["dense_mlp"].append(layer.mlp)
    return parts


def attention_flops(config, steps: list[BatchInfo]) -> float:
    """Useful causal attention FLOPs of ``steps`` over every layer: per query at position p,
    2 * (p + 1) * heads * (qk_dim + v_dim)."""
    per_pos = 2 * config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim
                                                + config.v_head_dim)
    keys = sum(sum(s + i + 1 for i in range(n)) for b in steps
               for s, n in zip(b.start_positions, b.lengths))
    return float(per_pos * keys * config.num_layers)


def run_point(model, config, point: Point, device, *, warmup: int, iters: int, seed: int) -> dict[str, Any]:
    cuda = device.type == "cuda"
    steps = point.steps()
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, config.vocab_size, (b.num_tokens,), generator=g).to(device) for b in steps]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    cache = model.make_cache(point.count, point.length, device)
    timer = ModuleTimer(module_parts(model), device)
    runs = []
    try:
        with torch.inference_mode():
            for it in range(warmup + iters):
                timer.reset()
                for tokens, batch in zip(ids, steps):
                    timer.mark()
                    model(tokens, batch, cache)
                timer.mark()
                if it >= warmup:
                    runs.append(timer.totals())
    finally:
        timer.close()
    peak = (torch.cuda.max_memory_allocated() - base) if cuda else 0
    del cache
    # mean over iterations, per step, then summed over the point's steps
    per_step = [{k: sum(r[i][k] for r in runs) / len(runs) for k in runs[0][i]} for i in range(len(steps))]
    total = {k: sum(s.get(k, 0.0) for s in per_step) for k in ("step", *PARTS, "attention_kernel")}
    total["rest"] = total["step"] - sum(total[p] for p in PARTS)
    tokens = point.length * point.count
    flops = attention_flops(config, steps)
    return {
        "point": point.name, "prompt_len": point.length, "prompts": point.count, "chunk": point.chunk,
        "tokens": tokens, "steps": len(steps), "tokens_per_step": [b.num_tokens for b in steps],
        "ms": total, "frac": {k: v / total["step"] for k, v in total.items() if k != "step"},
        "step_ms": [s["step"] for s in per_step],
        "step_ms_runs": [[s["step"] for s in r] for r in runs],
        "tokens_per_s": tokens / (total["step"] / 1e3),
        "attention_kernel_tflops": flops / (total["attention_kernel"] / 1e3) / 1e12 if total["attention_kernel"] else None,
        "peak_activation_gib": peak / 2**30,
    }


def decode_attention(model, config, device, *, batch: int, context: int, reps: int) -> dict[str, Any]:
    """One MLA layer's decode step for ``batch`` sequences of ``context`` cached tokens: latent
    (absorbed, batched) against expanded (kv_b_proj over each cached latent, per sequence)."""
    attn = model.model.layers[0].self_attn
    cache = model.make_cache(batch, context + 1, device)
    g = torch.Generator(device=device).manual_seed(0)
    for t in (cache.k[0], cache.v[0]):
        t.copy_(torch.randn(t.shape, generator=g, device=device, dtype=torch.float32).to(t.dtype))
    x = torch.randn(batch, config.hidden_size, generator=g, device=device).to(model.dtype) * 0.1
    pos = torch.full((batch,), context, dtype=torch.int64, device=device)
    cos, sin = model.rotary(pos, model.dtype)
    bi = BatchInfo(tuple(range(batch)), (context,) * batch, (1,) * batch)
    out = {"batch": batch, "context": context}
    for mode, batched in (("latent_ms", True), ("expanded_ms", False)):
        meta = StepMetadata.build(bi, cache.max_seqs, cache.max_len, device, batched_decode=batched)
        with torch.inference_mode():
            attn(x, meta, cache, cos, sin)  # warm-up (kernel choice, plans)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                attn(x, meta, cache, cos, sin)
            if device.type == "cuda":
                torch.cuda.synchronize()
        out[mode] = (time.perf_counter() - t0) * 1e3 / reps
    out["latent_speedup"] = out["expanded_ms"] / out["latent_ms"]
    del cache
    return out


def _timed(fn, device, reps: int) -> float:
    """Milliseconds per call of ``fn()`` after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / reps


def kernel_table(kernels: Kernels, config, device, shapes: list[tuple[int, int]],
                 chunks: list[tuple[int, int]], reps: int) -> list[dict[str, Any]]:
    """Prefill attention alone at the model's head shapes: ``count`` fresh prompts of ``length``
    tokens per prompt and in one ragged call (when the kernels have one); ``(prefix, chunk)``:
    a chunk attending to its prefix, merged by log-sum-exp. Useful causal TFLOP/s."""
    h, dk, dv = config.num_attention_heads, config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    scale = dk ** -0.5
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device).to(torch.bfloat16)

    out = []
    for count, length in shapes:
        n = count * length
        q, k, v = rnd(n, h, dk), rnd(n, h, dk), rnd(n, h, dv)
        lengths = (length,) * count
        cu = torch.arange(0, n + 1, length, dtype=torch.int32, device=device)
        flops = count * length * (length + 1) * h * (dk + dv)
        rec = {"prompts": count, "length": length}
        for name, fn in (("per_prompt", kernels.fresh), ("ragged", kernels.ragged)):
            if fn is None:
                continue
            try:
                ms = _timed(lambda: fn(q, k, v, lengths, cu, scale), device, reps)
                rec[f"{name}_ms"], rec[f"{name}_tflops"] = ms, flops / ms / 1e9
            except Exception as exc:
                rec[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        out.append(rec)
        del q, k, v
    for prefix, n in chunks:
        q, k, v = rnd(n, h, dk), rnd(prefix + n, h, dk), rnd(prefix + n, h, dv)

        def chunk():
            o1, l1 = kernels.with_lse(q, k[:prefix], v[:prefix], False, scale)
            o2, l2 = kernels.with_lse(q, k[prefix:], v[prefix:], True, scale)
            return merge_by_lse(o1, l1, o2, l2)

        flops = (2 * n * prefix + n * (n + 1)) * h * (dk + dv)
        ms = _timed(chunk, device, reps)
        out.append({"prefix": prefix, "chunk": n, "chunk_ms": ms, "chunk_tflops": flops / ms / 1e9})
        del q, k, v
    return out


def check_goals(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals on one H200, each with the measured figure and a verdict."""
    out = []
    for p in points:
        if "error" in p:
            out.append({"goal": f"{p['point']} runs", "measured": p["error"], "ok": False})
            continue
        if p["chunk"] is None and p["prompt_len"] in (2048, 8192):
            out.append({"goal": f"{p['point']}: attention <= {GOALS['attention_frac_max']:.0%} of the step",
                        "measured": round(p["frac"]["attention"], 4),
                        "ok": p["frac"]["attention"] <= GOALS["attention_frac_max"]})
            out.append({"goal": f"{p['point']}: >= {GOALS['tokens_per_s_min']} tokens/s",
                        "measured": round(p["tokens_per_s"]), "ok": p["tokens_per_s"] >= GOALS["tokens_per_s_min"]})
        if p["prompt_len"] >= 32768:
            out.append({"goal": f"{p['point']}: no OOM, >= {GOALS['long_tokens_per_s_min']} tokens/s",
                        "measured": round(p["tokens_per_s"]),
                        "ok": p["tokens_per_s"] >= GOALS["long_tokens_per_s_min"]})
    return out


def plot(results: dict[str, Any], path: str) -> None:
    """Stacked bars: milliseconds per 1K prompt tokens by part, one bar per point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in results["points"] if "error" not in p]
    parts = ("attention", "routed_experts", "shared_expert", "dense_mlp", "rest")
    colors = ("tab:red", "tab:blue", "tab:cyan", "tab:green", "tab:gray")
    fig, ax = plt.subplots(figsize=(1.8 * len(points) + 3, 4.8))
    labels = [f"{p['point']}\n{p['tokens_per_s'] / 1e3:.1f}K tok/s" for p in points]
    bottom = [0.0] * len(points)
    for part, color in zip(parts, colors):
        vals = [p["ms"][part] / (p["tokens"] / 1e3) for p in points]
        ax.bar(labels, vals, bottom=bottom, color=color, label=part.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("ms per 1K prompt tokens")
    meta = results["meta"]
    ax.set_title(f"prefill step breakdown, {meta['device_name']}, {meta['preset']} slice "
                 f"({meta['num_layers']} layers, {meta['moe_backend']} MoE, {meta['attention_kernels']} attention)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="deepseek-v3")
    p.add_argument("--num-moe-layers", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--moe-backend", default="cutedsl")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--points", default="2048x8,2048x16,8192x2,8192x4,32768x1/8192",
                   help="LxN (N prompts of L tokens in one step) or LxN/C (chunks of C tokens)")
    p.add_argument("--decode", default="4096,32768", help="decode-attention contexts to time (empty: none)")
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--kernel-shapes", default="1x2048,8x2048,16x2048,1x8192,2x8192,1x32768,32x512,64x256,128x128,256x64",
                   help="NxL fresh-prompt shapes for the attention-only table (empty: none)")
    p.add_argument("--kernel-chunks", default="8192+8192,24576+8192",
                   help="prefix+chunk shapes for the attention-only table")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quant", default="nvfp4", choices=["nvfp4", "fp8"],
                   help="fp8: the dense linears (MLA projections, dense MLP, shared expert) are "
                   "FP8 block 128 as in DeepSeek-V3's FP8 checkpoint (Fp8Linear: torch's blockwise "
                   "scaled GEMM on sm90); routed experts stay NVFP4 on --moe-backend either way "
                   "(default: nvfp4, bf16 dense linears)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    from tensorrt_llm_dwdp.moe.backends import get_backend

    config = bench_config(args.preset, args.num_moe_layers, args.vocab_size)
    if args.quant == "fp8":
        config = dataclasses.replace(config, linear_quant="fp8")
    try:
        backend = get_backend(args.moe_backend)
    except RuntimeError as exc:  # measure what runs here, and say so
        if device.type != "cuda":
            raise
        logger.warning("MoE backend %s unavailable (%s); measuring torch-grouped", args.moe_backend, exc)
        args.moe_backend = "torch-grouped"
        backend = get_backend(args.moe_backend)
    t0 = time.perf_counter()
    bm = build_bench_model("replicated", config, device=device, backend=backend,
                           rank=0, world_size=1, seed=args.seed)
    model = bm.model
    kernels = select_kernels(device, config.num_attention_heads, config.num_attention_heads,
                             config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim, model.dtype)
    results: dict[str, Any] = {"meta": {
        "preset": args.preset, "num_layers": config.num_layers, "num_moe_layers": args.num_moe_layers,
        "hidden_size": config.hidden_size, "heads": config.num_attention_heads, "experts": config.num_experts,
        "moe_backend": args.moe_backend, "attention_kernels": kernels.label,
        "dense_linears": "fp8" if args.quant == "fp8" else "bf16",
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "build_s": time.perf_counter() - t0, "warmup": args.warmup, "iters": args.iters,
        "routed_expert_gib": bm.tensor_bytes / 2**30}, "points": [], "decode_attention": []}
    os.makedirs(args.out, exist_ok=True)
    for text in [t for t in args.points.split(",") if t]:
        point = Point.parse(text)
        try:
            rec = run_point(model, config, point, device, warmup=args.warmup, iters=args.iters, seed=args.seed)
        except Exception as exc:  # an OOM at one point is a measured result, not the end of the run
            logger.exception("point %s failed", point.name)
            rec = {"point": point.name, "prompt_len": point.length, "chunk": point.chunk,
                   "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            logger.info("%s: %.0f tok/s, attention %.1f%% (kernel %.1f%%, %s TFLOP/s), routed %.1f%%, "
                        "peak activations %.1f GiB", point.name, rec["tokens_per_s"],
                        100 * rec["frac"]["attention"], 100 * rec["frac"]["attention_kernel"],
                        f"{rec['attention_kernel_tflops']:.0f}" if rec["attention_kernel_tflops"] else "-",
                        100 * rec["frac"]["routed_experts"], rec["peak_activation_gib"])
        results["points"].append(rec)
        with open(os.path.join(args.out, "prefill_breakdown.json"), "w") as f:
            json.dump(results, f, indent=1)
    shapes = [tuple(int(x) for x in t.lower().split("x")) for t in args.kernel_shapes.split(",") if t]
    chunks = [tuple(int(x) for x in t.split("+")) for t in args.kernel_chunks.split(",") if t]
    if shapes or chunks:
        results["attention_kernels_table"] = kernel_table(kernels, config, device, shapes, chunks, reps=5)
        for rec in results["attention_kernels_table"]:
            logger.info("attention alone: %s", rec)
    for ctx in [int(c) for c in args.decode.split(",") if c]:
        try:
            rec = decode_attention(model, config, device, batch=args.decode_batch, context=ctx, reps=5)
            logger.info("decode attention, %d x %d tokens: latent %.3f ms, expanded %.3f ms per layer (%.1fx)",
                        args.decode_batch, ctx, rec["latent_ms"], rec["expanded_ms"], rec["latent_speedup"])
        except Exception as exc:
            logger.exception("decode attention at %d failed", ctx)
            rec = {"batch": args.decode_batch, "context": ctx, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        results["decode_attention"].append(rec)
    results["goals"] = check_goals(results["points"])
    with open(os.path.join(args.out, "prefill_breakdown.json"), "w") as f:
        json.dump(results, f, indent=1)
    try:
        plot(results, os.path.join(args.out, "prefill_breakdown.png"))
    except ImportError as exc:
        logger.warning("no plot: %s", exc)
    for g in results["goals"]:
        print(f"{'MET ' if g['ok'] else 'MISS'} {g['goal']}: {g['measured']}")
    print(json.dumps({k: v for k, v in results.items() if k != "points"} | {
        "points": [{k: p.get(k) for k in ("point", "tokens_per_s", "frac", "attention_kernel_tflops",
                                           "peak_activation_gib", "error")} for p in results["points"]]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
