"""plan: the fit of our H200 prefill breakdown, on synthetic points whose terms are known."""
from __future__ import annotations

import dataclasses
import math

import pytest

pytest.importorskip("aiconfigurator_core")

from tensorrt_llm_dwdp.model.presets import get_preset
from tensorrt_llm_dwdp.plan.measured import MeasuredCosts, a2a_ms, fit_breakdown
from tensorrt_llm_dwdp.plan.model import from_config, resolve_model
from tensorrt_llm_dwdp.plan.system import load_system
from tensorrt_llm_dwdp.plan.traffic import Chunk

LAYERS, MOE = 11, 8


def _kernel(length):   # per layer per prompt, ms
    return 1e-6 * length ** 1.8


def _point(prompt_len, prompts):
    t = prompt_len * prompts
    kernel = LAYERS * prompts * _kernel(prompt_len)
    ms = {"attention_kernel": kernel, "attention": kernel + LAYERS * (0.5 + 1e-3 * t),
          "routed_experts": MOE * (7.0 + 2e-3 * t), "shared_expert": MOE * 1e-4 * t,
          "dense_mlp": (LAYERS - MOE) * 1e-3 * t, "rest": LAYERS * (0.1 + 2e-4 * t)}
    return {"point": f"{prompt_len}x{prompts}", "prompt_len": prompt_len, "prompts": prompts,
            "chunk": None, "tokens": t, "ms": ms}


DATA = {"meta": {"num_layers": LAYERS, "num_moe_layers": MOE},
        "points": [_point(2048, 8), _point(2048, 16), _point(8192, 2)],
        "attention_kernels_table": [
            {"prompts": 1, "length": 8192, "per_prompt_ms": 2.0},
            {"prompts": 1, "length": 32768, "per_prompt_ms": 2.0 * 4 ** 2.1}]}


def test_fit_recovers_the_terms():
    fit = fit_breakdown(DATA)
    assert fit.linear["routed_experts"] == pytest.approx((7.0, 2e-3))
    assert fit.linear["attention_proj"] == pytest.approx((0.5, 1e-3))
    assert fit.linear["rest"] == pytest.approx((0.1, 2e-4))
    assert fit.kernel(2048) == pytest.approx(_kernel(2048))
    assert fit.kernel(4096) == pytest.approx(_kernel(4096))       # log-log between knots
    # past 8192 the microbenchmark's slope (2.1) continues the in-step level
    assert fit.kernel(16384) == pytest.approx(_kernel(8192) * 2 ** 2.1)
    assert fit.lengths == (2048, 32768) and fit.tokens == (16384, 32768)


def test_step_costs_and_flags():
    model = from_config("v3-11", get_preset("deepseek-v3", num_layers=LAYERS), None, "nvfp4")
    costs = MeasuredCosts(fit_breakdown(DATA), model, load_system("h200_sxm"))
    c = costs.step([Chunk(i, 2048, 0) for i in range(8)], 1, [16384])
    ref = _point(2048, 8)["ms"]
    assert c.attention == pytest.approx(ref["attention"])
    assert c.moe == pytest.approx(ref["routed_experts"])
    assert c.dense == pytest.approx(ref["shared_expert"] + ref["dense_mlp"])
    assert not costs.notes.extrapolated
    chunk = costs.step([Chunk(0, 8192, 8192)], 1, [8192])
    assert chunk.attention - LAYERS * (0.5 + 1e-3 * 8192) == pytest.approx(
        LAYERS * (costs.fit.kernel(16384) - costs.fit.kernel(8192)))
    assert costs.notes.extrapolated     # 8192 tokens is below the fitted 16384-32768
    ep = costs.step([Chunk(0, 2048, 0)], 2, [2048, 8192])
    assert ep.moe == pytest.approx(MOE * (7.0 + 2e-3 * 5120))
    assert ep.a2a == pytest.approx(MOE * a2a_ms(8192, model, 2, 450e9))


def test_a2a_payload():
    m = resolve_model("deepseek-v3")
    miss = math.comb(128, 8) / math.comb(256, 8)
    payload = 1000 * 7168 * 2 * (1 - miss)
    from tensorrt_llm_dwdp.plan.reference import COPY_H200
    assert a2a_ms(1000, m, 2, 450e9) == pytest.approx(2 * payload / (450e9 * COPY_H200.efficiency) * 1e3)


def test_measured_rejects_other_shapes_and_systems():
    with pytest.raises(ValueError, match="DeepSeek-V3 NVFP4 experts only"):
        MeasuredCosts(fit_breakdown(DATA), resolve_model("qwen3-30b-a3b"), load_system("h200_sxm"))
    with pytest.raises(ValueError, match="H200 data only"):
        MeasuredCosts(fit_breakdown(DATA), resolve_model("deepseek-v3"), load_system("gb200"))


def test_copy_constants_are_the_prefetch_bench_figures():
    import json
    import os

    from bench.plan_validation import ROOT
    from tensorrt_llm_dwdp.plan import reference as ref
    with open(os.path.join(ROOT, ref.PREFETCH_JSON)) as f:
        d = json.load(f)
    assert tuple(d["raw_peer_memcpy_gbps"]) == ref.H200_RAW_PEER_GBPS
    ranks = d["results"]["contention_opt_off"]["per_rank"]
    assert tuple((r["compute_ms_per_layer"], r["overlap_layer_ms"]) for r in ranks) \
        == ref.H200_COMPUTE_VS_OVERLAP_MS
    assert 0.7 < ref.COPY_H200.efficiency < 0.9 and 0.0 < ref.COPY_H200.interference < 0.1


def test_h200_comparison_prices_attention_with_its_projections():
    """Our measured attention includes the MLA projections; the database side of the H200
    comparison must too (DeepSeek-V3's FP8 checkpoint: one attention module), not the NVFP4
    layout whose attention term is the FMHA alone (that halved the database's figure)."""
    from tensorrt_llm_dwdp.plan.build import _compare
    from tensorrt_llm_dwdp.plan.costs import AicCosts
    model, h200 = resolve_model("deepseek-v3"), load_system("h200_sxm")
    assert model.aic_id == "nvidia/DeepSeek-V3.1-NVFP4"
    measured = MeasuredCosts.from_breakdown(model, h200)
    out = _compare(model, h200, measured)
    db = AicCosts(resolve_model("deepseek-v3-fp8"), h200)
    chunks = [Chunk(i, 8192, 0) for i in range(2)]
    want = db.step(chunks, 1, [16384]).attention / model.num_layers
    got = out["points"][0]["attention"]["database_ms_per_layer"]
    assert got == pytest.approx(want, rel=1e-9)
    fmha_only = AicCosts(dataclasses.replace(model, quant="fp8"), h200)
    assert fmha_only.step(chunks, 1, [16384]).attention / model.num_layers < 0.8 * got
