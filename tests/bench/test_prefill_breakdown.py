"""bench/prefill_breakdown.py on the CPU at the tiny scale (the device runs it at DeepSeek-V3
scale): the parts add up to the step, chunked points run one step per chunk, the goals are
judged from the records, and the JSON and plot are written."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from bench.prefill_breakdown import Point, check_goals  # noqa: E402


def test_points_parse_into_steps():
    assert [b.lengths for b in Point.parse("2048x3").steps()] == [(2048, 2048, 2048)]
    steps = Point.parse("40x2/16").steps()
    assert [(b.slots, b.start_positions, b.lengths) for b in steps] == [
        ((0,), (0,), (16,)), ((0,), (16,), (16,)), ((0,), (32,), (8,)),
        ((1,), (0,), (16,)), ((1,), (16,), (16,)), ((1,), (32,), (8,))]
    assert Point.parse("32768x1/8192").name == "32768x1/8192"


def test_goals_are_judged_from_the_measured_figures():
    def rec(point, length, chunk, tps, attn):
        return {"point": point, "prompt_len": length, "chunk": chunk, "tokens_per_s": tps,
                "frac": {"attention": attn}}

    goals = check_goals([rec("2048x8", 2048, None, 31_000, 0.19), rec("8192x2", 8192, None, 29_000, 0.25),
                         rec("32768x1/8192", 32768, 8192, 18_500, 0.4),
                         {"point": "32768x2/8192", "prompt_len": 32768, "chunk": 8192, "error": "OOM"}])
    assert [g["ok"] for g in goals] == [True, True, False, False, True, False]


@pytest.mark.parametrize("quant", ["nvfp4", "fp8"])
def test_breakdown_runs_on_the_tiny_model(tmp_path, quant):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "prefill_breakdown.py"), "--out", str(tmp_path),
           "--device", "cpu", "--preset", "tiny-deepseek-v3", "--moe-backend", "torch",
           "--num-moe-layers", "2", "--vocab-size", "512", "--points", "16x2,40x1/16",
           "--decode", "8", "--decode-batch", "2", "--warmup", "0", "--iters", "1",
           "--kernel-shapes", "2x16", "--kernel-chunks", "16+8", "--quant", quant]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "prefill_breakdown.json").read_text())
    assert r["meta"]["attention_kernels"] == "cpu-flash" and r["meta"]["num_layers"] == 3
    assert r["meta"]["dense_linears"] == ("fp8" if quant == "fp8" else "bf16")
    one, chunked = r["points"]
    assert one["tokens"] == 32 and one["steps"] == 1
    assert chunked["tokens_per_step"] == [16, 16, 8] and len(chunked["step_ms"]) == 3
    for p in (one, chunked):
        parts = sum(p["ms"][k] for k in ("attention", "routed_experts", "shared_expert", "dense_mlp", "rest"))
        assert abs(parts - p["ms"]["step"]) < 1e-6 * p["ms"]["step"] + 1e-9
        assert 0 < p["ms"]["attention_kernel"] < p["ms"]["attention"] < p["ms"]["step"]
        assert p["ms"]["routed_experts"] > 0 and p["ms"]["dense_mlp"] > 0 and p["tokens_per_s"] > 0
    fresh, chunk = r["attention_kernels_table"]
    assert fresh["per_prompt_tflops"] > 0 and "ragged_ms" not in fresh  # the CPU has no ragged call
    assert chunk["prefix"] == 16 and chunk["chunk_tflops"] > 0
    (dec,) = r["decode_attention"]
    assert dec["context"] == 8 and dec["latent_ms"] > 0 and dec["expanded_ms"] > 0
    assert (tmp_path / "prefill_breakdown.png").stat().st_size > 1000
