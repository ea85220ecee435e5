"""plan's command line: the issue's done-when invocation, its JSON, table and plot."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("aiconfigurator_core")
pytest.importorskip("matplotlib")

from tensorrt_llm_dwdp.cli import main


def test_done_when_invocation(tmp_path, capsys):
    out, png = tmp_path / "out.json", tmp_path / "plan.png"
    rc = main(["--log-level", "WARNING", "plan", "--model", "deepseek-r1-nvfp4", "--system",
               "gb200", "--gpus", "4", "--isl", "8192", "--ratio", "0.8", "--max-num-tokens",
               "32768", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "PREDICTION" in text and "beside TensorRT-LLM blog 19" in text
    assert "aiconfigurator-core 0.12" in text and "trtllm" in text
    assert "recommendation:" in text
    plan = json.loads(out.read_text())
    assert plan["prediction"] is True and plan["blog19"]["iteration"]["DEP4"]["iteration"] == 1319.85
    labels = {r["label"]: r for r in plan["rows"]}
    assert {"replicated", "DEP2", "DEP4", "DWDP4 W64 P64", "DWDP4 W64 P64+copt"} <= set(labels)
    assert not labels["replicated"]["fits"]          # 671B NVFP4 does not fit one GB200
    for label in ("DEP4", "DWDP4 W64 P64"):
        r = labels[label]
        for term in ("attention", "moe", "dense", "a2a", "sync_wait", "copy_exposed",
                     "interference", "step", "copy_total"):
            assert term in r["breakdown_ms"]
        assert set(r["tokens_per_s_per_gpu"]) == {"own_rate", "lockstep"}
        assert set(r["stream"]["ttft_ms"]) == {"p50", "p90", "p99"}
    assert labels["DEP4"]["breakdown_ms"]["a2a"] > 0 and labels["DEP4"]["breakdown_ms"]["sync_wait"] > 0
    assert labels["DWDP4 W64 P64"]["breakdown_ms"]["copy_total"] > 0
    assert labels["DWDP4 W64 P64"]["breakdown_ms"]["a2a"] == 0
    assert plan["costs"]["framework"] == "trtllm" and plan["costs"]["database_version"]
    assert plan["notes"]["extrapolated"]            # 32K-token steps pass the MoE table
    assert plan["recommendation"]["choice"] and plan["recommendation"]["why"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_roofline_breakers_are_dropped_and_reported():
    """SGLang's FP8 MoE rows for a few dozen tokens on H200 read DeepSeek-V3's experts faster
    than H200's HBM allows; such a point is replaced by the roofline floor and reported."""
    from tensorrt_llm_dwdp.plan.costs import AicCosts
    from tensorrt_llm_dwdp.plan.model import resolve_model
    from tensorrt_llm_dwdp.plan.system import load_system
    from tensorrt_llm_dwdp.plan.traffic import Chunk

    model, system = resolve_model("deepseek-v3-fp8"), load_system("h200_sxm")
    costs = AicCosts(model, system, "sglang")
    cost = costs.step([Chunk(0, 128, 0)], 1, [128])
    (d,) = costs.notes.dropped
    assert d["tokens"] == 128 and d["implied_hbm_tbps"] > d["peak_hbm_tbps"] == 4.8
    assert cost.moe == pytest.approx(d["replaced_by_roofline_us"] / 1e3 * model.num_moe_layers)
    costs.step([Chunk(0, 128, 0)], 1, [128])
    assert len(costs.notes.dropped) == 1                      # reported once
    big = costs.step([Chunk(0, 8192, 0)], 1, [8192])
    assert len(costs.notes.dropped) == 1 and big.moe > cost.moe


def test_readme_predictions_render_from_committed_json():
    import os

    from bench.plan_readme import CASES, OUT, table
    for name in CASES:
        with open(os.path.join(OUT, f"{name}.json")) as f:
            plan = json.load(f)
        assert plan["prediction"] is True and plan["recommendation"]["choice"]
    text = table()
    assert "S = 4" in text and "S = 8" in text and "deepseek-v3-fp8 on 8x h200_sxm" in text
    assert text.count("(recommended)") == len(CASES)
