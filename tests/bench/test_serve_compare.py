"""bench/serve_compare.py: the length distribution and the comparison on hand-made runs (a
failed mode or request is missed, never dropped), and a CPU smoke run of all three modes
through real deployments (mpirun context groups, router, tiny preset)."""
import json
import math
import os
import subprocess
import sys

import pytest

from bench.serve_compare import (compare, merge_rounds, ratio_spread, sample_lengths, step_figures,
                                 summary_markdown)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_lengths_are_long_tailed_and_deterministic():
    kw = dict(median=8192, sigma=0.6, long_len=32768, long_frac=0.1, min_len=256, max_len=32768)
    a = sample_lengths(200, seed=3, **kw)
    assert a == sample_lengths(200, seed=3, **kw) and a != sample_lengths(200, seed=4, **kw)
    assert a.count(32768) >= 20 and all(256 <= n <= 32768 for n in a)
    short = sorted(n for n in a if n != 32768)
    assert 0.7 * 8192 < short[len(short) // 2] < 1.4 * 8192
    with pytest.raises(ValueError, match="median"):
        sample_lengths(4, median=10, sigma=0.5, long_len=8, long_frac=0.1, min_len=1, max_len=8, seed=0)


def _run(tps, p50, p99, mem_gib, errors=0):
    return {"input_tokens_per_s": tps, "ttft_ms": {"p50": p50, "p99": p99},
            "expert_memory_bytes_per_rank": [mem_gib * 2**30] * 2, "completed": 10 - errors,
            "errors": errors, "error_samples": ["HTTP 502"] if errors else [],
            "prefill_tokens_per_rank": [5000, 4000]}


def _report(modes):
    meta = {"gpus": 2, "model_name": "m", "hidden_size": 64, "num_experts": 16, "top_k": 4,
            "num_moe_layers": 2, "num_layers": 3, "ranks": 2, "gpus_text": "2x GPU",
            "moe_backend": "torch", "num_prompts": 10, "median_len": 100, "sigma": 0.6,
            "long_frac": 0.1, "long_len": 400, "total_prompt_tokens": 9000, "load": "closed loop"}
    report = {"meta": meta, "modes": modes}
    report["comparison"] = compare(report)
    return report


def test_comparison_per_gpu_and_ratios():
    r = _report({"dwdp": _run(20000, 100, 400, 6.0), "ep": _run(16000, 120, 800, 4.5),
                 "replicated": _run(21000, 95, 380, 12.0)})
    d = r["comparison"]["modes"]["dwdp"]
    assert d["prefill_tokens_per_s_per_gpu"] == 10000
    ep = r["comparison"]["ratios"]["dwdp_vs_ep"]
    assert ep["throughput"] == pytest.approx(1.25) and ep["ttft_p99"] == pytest.approx(0.5)
    assert r["comparison"]["ratios"]["dwdp_vs_replicated"]["expert_memory"] == pytest.approx(0.5)
    assert "| dwdp | 1 | 10000 |" in summary_markdown(r)


def _passes(*tps, p50=100.0, p99=400.0, rnd=0):
    return [{"round": rnd, "input_tokens_per_s": t, "ttft_p50_ms": p50, "ttft_p99_ms": p99,
             "completed": 10, "errors": 0, "kernel_compiles": 0} for t in tps]


def test_repeated_passes_give_medians_spread_and_a_crossing_flag():
    dwdp = {**_run(20000, 100, 400, 6.0), "passes": _passes(20000, 30000, 18000, 22000, 26000)}
    ep = {**_run(21000, 120, 800, 4.5), "passes": _passes(21000, 19000, 24000, 20000, 23000)}
    far = {**_run(9000, 90, 300, 12.0), "passes": _passes(9000, 9500, 8000, 8800, 9100)}
    r = _report({"dwdp": dwdp, "ep": ep, "replicated": far})
    d = r["comparison"]["modes"]["dwdp"]
    assert d["passes"] == 5 and d["prefill_tokens_per_s_per_gpu"] == 11000  # median 22000 / 2 GPUs
    assert d["spread"]["prefill_tokens_per_s_per_gpu"] == {"median": 11000, "min": 9000,
                                                           "max": 15000, "n": 5}
    vs_ep = r["comparison"]["ratios"]["dwdp_vs_ep"]
    assert vs_ep["throughput"] == pytest.approx(22000 / 21000)
    sp = vs_ep["spread"]["throughput"]
    assert sp["min"] == pytest.approx(18000 / 24000) and sp["max"] == pytest.approx(30000 / 19000)
    assert sp["crosses_1"] and "crosses 1.0" in vs_ep["spread_crosses_1"][0]
    vs_rep = r["comparison"]["ratios"]["dwdp_vs_replicated"]
    assert not vs_rep["spread"]["throughput"]["crosses_1"] and "spread_crosses_1" not in vs_rep
    text = summary_markdown(r)
    assert "| dwdp | 5 | 11000 [9000-15000] |" in text and "crosses 1" in text


def test_ratio_spread_direction_and_rounds_merge():
    assert ratio_spread([2.0, 2.2], [1.0, 1.1])["crosses_1"] is False
    low = ratio_spread([1.0, 1.2], [1.1, 1.3], higher_is_better=False)
    assert low["crosses_1"] and "lower" in low["note"]
    assert ratio_spread([], [1.0]) is None
    a = {**_run(1, 1, 1, 1), "passes": _passes(1, 2)}
    b = {**_run(3, 1, 1, 1), "passes": _passes(3, rnd=1)}
    merged = merge_rounds(merge_rounds(None, a), b)
    assert [p["input_tokens_per_s"] for p in merged["passes"]] == [1, 2, 3]
    assert merge_rounds(merged, {"error": "start failed"})["error"] == "start failed"


def test_failed_mode_or_request_is_missed():
    r = _report({"dwdp": _run(20000, 100, 400, 6.0, errors=2),
                 "ep": {"error": "start failed: RuntimeError: CUDA out of memory"},
                 "replicated": _run(21000, 95, 380, 12.0)})
    cmp_ = r["comparison"]
    assert "2 request(s) failed" in cmp_["modes"]["dwdp"]["missed"]
    assert "missed" in cmp_["ratios"]["dwdp_vs_ep"] and "missed" in cmp_["ratios"]["dwdp_vs_replicated"]
    assert "out of memory" in summary_markdown(r)


def _step(kind, start, wall, tokens, compiles=0, device=None):
    return {"index": 0, "kind": kind, "start": start, "wall_s": wall, "device_s": device,
            "tokens": tokens, "sequences": 1, "compiles": compiles, "compile_s": 2.0 * compiles}


def test_step_figures_overlap_solo_and_compiles():
    # rank 0: a 1 s step alone, then a 1 s step beside rank 1's; rank 1 compiled in its step
    r0 = [_step("prefill", 0.0, 1.0, 8000), _step("prefill", 2.0, 1.0, 4000)]
    r1 = [_step("prefill", 2.0, 1.0, 200, compiles=2), _step("idle", 3.0, 0.5, 0)]
    f0, f1 = step_figures([r0, r1], duration_s=4.0)
    assert f0["steps"] == {"prefill": 2, "decode": 0, "idle": 0} and f1["steps"]["idle"] == 1
    assert f0["tokens_per_step"] == {"min": 4000, "p50": 8000, "mean": 6000, "max": 8000}
    assert f0["tokens_per_step_counts"] == {"<=4096": 1, "<=8192": 1}
    assert f0["busy_s"] == 2.0 and f0["busy_fraction"] == 0.5 and f0["device_s"] is None
    assert f0["overlap"] == pytest.approx(0.5) and f1["overlap"] == pytest.approx(1.0 / 1.5)
    assert f0["solo_prefill_tokens_per_s"] == 8000 and f0["overlapped_prefill_tokens_per_s"] == 4000
    assert f1["kernel_compiles"] == 2 and f1["kernel_compile_s"] == 4.0
    run = {**_run(20000, 100, 400, 6.0), "steps_per_rank": [f0, f1]}
    r = _report({"dwdp": run, "ep": _run(16000, 120, 800, 4.5)})
    d = r["comparison"]["modes"]["dwdp"]
    assert "2 kernel(s) JIT-compiled" in d["warnings"][0] and "missed" not in d
    assert r["comparison"]["ratios"]["dwdp_vs_ep"]["warnings"] == d["warnings"]
    text = summary_markdown(r)
    assert "(see warnings)" in text and "| dwdp | 1 | 1 (1) | 200 / 200 / 200 |" in text


@pytest.mark.multirank
def test_smoke_all_modes_on_cpu(tmp_path):
    out = tmp_path / "compare"  # the context groups: mpirun where installed, else TCP
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "serve_compare.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "serve_compare.json").read_text())
    assert set(report["modes"]) == {"dwdp", "ep", "replicated"}
    for mode, f in report["comparison"]["modes"].items():
        assert "missed" not in f, (mode, f)
        assert f["completed"] == report["meta"]["num_prompts"] and f["prefill_tokens_per_s_per_gpu"] > 0
        assert f["passes"] == 2 and len(report["modes"][mode]["passes"]) == 2  # --smoke: 2 passes
        assert 0 < f["ttft_p50_ms"] <= f["ttft_p99_ms"]
        assert len(f["expert_memory_gib_per_rank"]) == 2 and None not in f["expert_memory_gib_per_rank"]
        run = report["modes"][mode]
        assert sum(run["prefill_tokens_per_rank"]) >= report["meta"]["total_prompt_tokens"]
        # the servers' step logs cover the stream exactly: every prompt token in a logged step
        assert run["step_records_complete"] is True
        steps = run["steps_per_rank"]
        assert [s["prefill_tokens"] for s in steps] == run["prefill_tokens_per_rank"]
        assert all(s["kernel_compiles"] == 0 and 0 < s["busy_fraction"] <= 1 for s in steps)
        assert all(s["steps"]["idle"] == 0 for s in steps) or mode == "ep"
    assert all(not math.isnan(v["throughput"]) for v in report["comparison"]["ratios"].values())
    assert (out / "serve_compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
