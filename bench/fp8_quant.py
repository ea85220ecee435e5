"""Bench: the fused FP8 activation quantization (``kernels/sm90/fp8_quant``) against the eager
torch reference (``quant.fp8.quantize_act_per_token``, what the FP8 paths ran before) and the
HBM floor, at DeepSeek-V3 activation widths, one device, one run.

Per shape ``[T, K]`` (bf16 in, e4m3 + fp32 scale per 128 channels out) it times:
  ours_row / ours_col  the kernel launched eagerly from Python (scale row-major / group-major),
                       host overhead included (what an uncaptured caller pays);
  ours_graph           the row kernel replayed from a CUDA graph (device time);
  reference            the eager torch recipe (its inf/NaN check syncs the host every call);
  compiled             the same recipe under torch.compile (dynamic shapes, as
                       ``model/fp8_linear.py`` runs it before this kernel; not bitwise: JSON
                       ``compiled_bitwise``); null with the reason when it cannot compile here;
  floor                bytes moved (2 B read + 1 B written per element, 4 B per scale) over
                       the device's measured copy bandwidth (``bench/peaks.py``).
Each time is the median over ``--repeats`` runs of N back-to-back calls (N sized to ~10 ms),
with min / max as the spread; ``bitwise`` says the kernel matched the reference on that input.
Prints one JSON document; ``--out`` also writes it.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from tensorrt_llm_dwdp.kernels.compile_cache import CompileCache
from tensorrt_llm_dwdp.kernels.sm90.fp8_quant import quantize_act_per_token_cuda
from tensorrt_llm_dwdp.quant.fp8 import quantize_act_per_token

try:
    from bench.json_out import emit
    from bench.peaks import pct_of, peak_for
except ImportError:  # run as a script from the repo root: bench/ is sys.path[0]
    from json_out import emit
    from peaks import pct_of, peak_for

# DeepSeek-V3 activation widths that FP8 linears / experts quantize.
WIDTHS = {
    7168: "hidden (q_a / kv_a / MoE FC1 / shared experts input)",
    18432: "dense MLP intermediate (down_proj input)",
    16384: "attention output (o_proj input, 128 heads x 128)",
    2048: "MoE intermediate (FC2 input)",
    1536: "q_lora (q_b_proj input)",
}
TOKENS = (1, 64, 512, 4096, 16384)
EXTRA = ((65536, 7168),)


def _time(fn, repeats: int, target_ms: float = 10.0) -> dict:
    """Median / min / max milliseconds per call over ``repeats`` runs of N calls."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once_ms = (time.perf_counter() - t0) * 1e3
    calls = int(min(200, max(3, target_ms / max(once_ms, 1e-3))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "calls": calls}


def _time_graph(fn, repeats: int, calls: int = 20) -> dict:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "calls": calls}


def compiled_reference():
    """``(fn, None)``: the reference under torch.compile, or ``(None, reason)``."""
    try:
        import triton  # noqa: F401  (torch.compile's GPU code generator)
    except ImportError:
        return None, "triton is not installed"
    return torch.compile(quantize_act_per_token, dynamic=True, fullgraph=True), None


def bench_shape(cache: CompileCache, t: int, k: int, repeats: int, copy_gbps: float | None,
                compiled=None):
    gen = torch.Generator(device="cuda").manual_seed(t + k)
    x = torch.randn(t, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    q, s = quantize_act_per_token_cuda(cache, x)
    want_q, want_s = quantize_act_per_token(x)
    bitwise = bool(torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
                   and torch.equal(s.view(torch.int32), want_s.view(torch.int32)))
    qc, sc = quantize_act_per_token_cuda(cache, x, scale_layout="col")
    bitwise &= bool(torch.equal(qc.view(torch.uint8), want_q.view(torch.uint8))
                    and torch.equal(sc.contiguous().view(torch.int32), want_s.view(torch.int32)))
    del want_q, want_s, qc, sc
    out, scale_out = torch.empty_like(q), torch.empty_like(s)
    res = {
        "tokens": t, "k": k, "width": WIDTHS.get(k, ""), "bitwise": bitwise,
        "ours_row": _time(lambda: quantize_act_per_token_cuda(cache, x, out=out,
                                                              scale_out=scale_out), repeats),
        "ours_col": _time(lambda: quantize_act_per_token_cuda(cache, x, scale_layout="col"),
                          repeats),
        "ours_graph": _time_graph(lambda: quantize_act_per_token_cuda(
            cache, x, out=out, scale_out=scale_out), repeats),
        "reference": _time(lambda: quantize_act_per_token(x), repeats),
    }
    if compiled is not None:
        try:
            cq, cs = compiled(x)
            res["compiled_bitwise"] = bool(torch.equal(cq.view(torch.uint8), q.view(torch.uint8))
                                           and torch.equal(cs, s))
            res["compiled"] = _time(lambda: compiled(x), repeats)
        except Exception as exc:  # a compile failure is a finding of the bench, not a crash
            res["compiled"] = None
            res["compiled_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    moved = t * k * 3 + t * (k // 128) * 4
    res["bytes"] = moved
    res["floor_ms"] = moved / (copy_gbps * 1e6) if copy_gbps else None
    graph_ms = res["ours_graph"]["median_ms"]
    res["ours_graph_tbps"] = moved / graph_ms / 1e9
    res["ours_graph_pct_of_copy_peak"] = pct_of(moved / graph_ms / 1e6, copy_gbps)
    res["speedup_vs_reference_eager"] = res["reference"]["median_ms"] / res["ours_row"]["median_ms"]
    res["speedup_vs_reference_graph"] = res["reference"]["median_ms"] / graph_ms
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS))
    parser.add_argument("--widths", type=int, nargs="*", default=list(WIDTHS))
    parser.add_argument("--no-compiled", action="store_true",
                        help="skip the torch.compile baseline")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/fp8_quant.py needs a CUDA device")
    name = torch.cuda.get_device_name()
    peak = peak_for(name)
    cache = CompileCache()
    compiled, compiled_reason = (None, "--no-compiled") if args.no_compiled else \
        compiled_reference()
    shapes = [(t, k) for k in args.widths for t in args.tokens] + [
        s for s in EXTRA if s[1] in args.widths]
    results = []
    for t, k in shapes:
        results.append(bench_shape(cache, t, k, args.repeats, peak.copy_gbps if peak else None,
                                   compiled))
        if "compiled_error" in results[-1]:  # do not pay a failing compile per shape
            compiled, compiled_reason = None, results[-1]["compiled_error"]
        torch.cuda.empty_cache()
    emit({
        "bench": "fp8_quant",
        "device": name,
        "torch": torch.__version__,
        "peak": peak.to_dict() if peak else None,
        "compile_seconds": cache.compile_seconds,
        "compiled_baseline": compiled_reason or "torch.compile(dynamic=True, fullgraph=True)",
        "all_bitwise": all(r["bitwise"] for r in results),
        "results": results,
    }, args.out)


if __name__ == "__main__":
    main()
