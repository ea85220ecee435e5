"""plan: traffic, model, system and layout inputs, and the one-line errors for bad ones."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("aiconfigurator_core")

from tensorrt_llm_dwdp.moe.specs import expert_nbytes
from tensorrt_llm_dwdp.plan.deploy import DWDP, Deployment, dwdp_layouts, memory_per_gpu
from tensorrt_llm_dwdp.plan.model import expert_bytes, resolve_model
from tensorrt_llm_dwdp.plan.planner import PlanRequest, check_request, pick_layouts
from tensorrt_llm_dwdp.plan.system import load_system
from tensorrt_llm_dwdp.plan.traffic import Chunk, pack_steps, parse_isl


def test_isl_forms_and_ratio():
    rng = np.random.default_rng(1)
    assert set(parse_isl("8192").sample(50, rng)) == {8192}
    assert set(parse_isl("1024,4096").sample(200, rng)) == {1024, 4096}
    u = parse_isl("uniform:100-200").sample(500, rng)
    assert u.min() >= 100 and u.max() <= 200
    r = parse_isl("8192", ratio=0.8).sample(2000, rng)
    assert r.min() >= int(0.8 * 8192) and r.max() <= 8192 and len(set(r)) > 100
    ln = parse_isl("lognormal:2000,0.5")
    assert 1500 < np.median(ln.sample(4000, rng)) < 2600


@pytest.mark.parametrize("bad", ["", "abc", "uniform:5", "uniform:9-3", "lognormal:10", "0", "-5"])
def test_isl_rejects(bad):
    with pytest.raises(ValueError, match="--isl"):
        parse_isl(bad)


def test_ratio_rejected_outside_unit_interval():
    with pytest.raises(ValueError, match="--ratio"):
        parse_isl("8192", ratio=0.0)


def test_pack_steps_budget_and_chunking():
    steps = pack_steps(np.array([3000, 3000, 3000, 9000, 100]), budget=8192)
    assert [[(c.request, c.length, c.prefix) for c in s] for s in steps] == [
        [(0, 3000, 0), (1, 3000, 0)],
        [(2, 3000, 0)],
        [(3, 8192, 0)],
        [(3, 808, 8192), (4, 100, 0)],
    ]
    for s in steps:
        assert sum(c.length for c in s) <= 8192
    assert pack_steps(np.array([8192]), 8192) == [[Chunk(0, 8192, 0)]]


def test_model_names_and_expert_bytes():
    r1 = resolve_model("deepseek-r1-nvfp4")
    assert (r1.hidden, r1.moe_inter, r1.num_experts, r1.top_k) == (7168, 2048, 256, 8)
    assert (r1.num_layers, r1.num_moe_layers, r1.quant) == (61, 58, "nvfp4")
    assert r1.expert_bytes == expert_nbytes("nvfp4", 7168, 2048)
    v3 = resolve_model("deepseek-v3", "fp8")
    # e4m3 weights (1 byte per element) plus fp32 scales per 128x128 block of w3_w1 and w2
    assert v3.expert_bytes == 3 * 7168 * 2048 + 4 * (32 * 56 + 56 * 16)
    # NVFP4 DeepSeek is compiled as NVIDIA's NVFP4 checkpoint layout (bf16 q/kv projections)
    assert resolve_model("deepseek-ai--DeepSeek-V3").aic_id == "nvidia/DeepSeek-V3.1-NVFP4"
    assert resolve_model("deepseek-ai--DeepSeek-V3", "fp8").aic_id == "deepseek-ai/DeepSeek-V3"
    assert r1.aic_id == "nvidia/DeepSeek-V3.1-NVFP4"
    assert resolve_model("deepseek-r1-fp8").aic_id == "deepseek-ai/DeepSeek-R1"
    assert expert_bytes("fp8", 7168, 2048) < expert_bytes("nvfp4", 7168, 2048) * 2


def test_model_from_config_path(tmp_path):
    import json

    from tensorrt_llm_dwdp.model.presets import get_preset
    (tmp_path / "config.json").write_text(json.dumps(get_preset("qwen3-30b-a3b")))
    m = resolve_model(str(tmp_path / "config.json"))
    assert (m.num_experts, m.top_k, m.num_moe_layers) == (128, 8, 48)
    assert m.aic_id == str(tmp_path)


def test_unknown_model_and_system():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        resolve_model("nope")
    with pytest.raises(ValueError, match="unknown system 'h999'"):
        load_system("h999")
    with pytest.raises(ValueError, match="--quant"):
        resolve_model("deepseek-v3", "int3")


def test_dense_model_rejected(tmp_path):
    import json
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2,
                                                      "num_attention_heads": 4}))
    with pytest.raises(ValueError, match="no routed experts"):
        resolve_model(str(tmp_path))


def test_layouts_divide_and_memory():
    m = resolve_model("deepseek-r1-nvfp4")
    for s in (2, 3, 4, 5, 8):
        layouts = dwdp_layouts(m, s)
        assert layouts == sorted(layouts)
        assert len(layouts) == sum(1 for p in range(1, 256) if 256 - (s - 1) * p >= p)
        for w, p in layouts:
            assert w + (s - 1) * p == 256 and 1 <= p <= w
    assert dwdp_layouts(m, 4)[0] == (64, 64) and dwdp_layouts(m, 3)[0] == (86, 85)
    gb = load_system("gb200")
    # GB200 (185 GiB): the disjoint split, the largest W that fits, and one between
    picked = pick_layouts(m, gb, 8, 32768)
    assert picked[0] == (32, 32) and len(picked) == 3
    w_max = picked[-1][0]
    assert memory_per_gpu(Deployment(DWDP, 8, *picked[-1]), m, gb, 32768)["fits"]
    bigger = [wp for wp in dwdp_layouts(m, 8) if wp[0] > w_max]
    assert not memory_per_gpu(Deployment(DWDP, 8, *bigger[0]), m, gb, 32768)["fits"]
    mem = memory_per_gpu(Deployment(DWDP, 4, 64, 64), m, gb, 32768)
    assert mem["experts"] == (58 * 64 + 2 * 3 * 64) * m.expert_bytes
    rep = memory_per_gpu(Deployment("replicated", 1), m, gb, 32768)
    assert not rep["fits"] and mem["fits"]


def _req(**kw):
    base = dict(gpus=4, traffic=parse_isl("8192"), max_num_tokens=32768)
    base.update(kw)
    return PlanRequest(**base)


def test_check_request_names_the_bad_input():
    m, gb = resolve_model("deepseek-r1-nvfp4"), load_system("gb200")
    check_request(_req(), m, gb)
    with pytest.raises(ValueError, match="exceed deepseek-r1-nvfp4's max_position_embeddings 163840"):
        check_request(_req(traffic=parse_isl("200000")), m, gb)
    with pytest.raises(ValueError, match="--dwdp-size 3 must be >= 2 and divide --gpus 4"):
        check_request(_req(dwdp_size=3), m, gb)
    with pytest.raises(ValueError, match="--experts-per-worker 101 does not divide 256"):
        check_request(_req(dwdp_size=4, experts_per_worker=101), m, gb)
    with pytest.raises(ValueError, match="--experts-per-worker needs --dwdp-size"):
        check_request(_req(experts_per_worker=64), m, gb)
    with pytest.raises(ValueError, match="--steps"):
        check_request(_req(num_steps=0), m, gb)
    with pytest.raises(ValueError, match="--rate"):
        check_request(_req(rate=-1.0), m, gb)
    h200 = load_system("h200_sxm")
    with pytest.raises(ValueError, match="NVLink domain of 8"):
        check_request(_req(gpus=16, dwdp_size=16), m, h200)


@pytest.mark.parametrize("args,needle", [
    (["--model", "nope"], "unknown model 'nope'"),
    (["--system", "h999"], "unknown system 'h999'"),
    (["--isl", "300000"], "max_position_embeddings"),
    (["--dwdp-size", "4", "--experts-per-worker", "65"], "does not divide 256"),
    (["--quant", "fp8"], "--quant fp8 contradicts --model deepseek-r1-nvfp4; use --model "
                         "deepseek-r1-fp8"),
    (["--model", "deepseek-v3-fp8", "--system", "h100_sxm", "--gpus", "8"],
     "no deployment of deepseek-v3-fp8 fits h100_sxm's 80 GiB per GPU on 8 GPUs"),
    (["--isl", "lognormal:4000"], "lognormal:MEDIAN,SIGMA"),
    (["--ratio", "0"], "--ratio 0.0 must be in (0, 1]"),
])
def test_cli_bad_input_is_one_line(args, needle):
    base = {"--model": "deepseek-r1-nvfp4", "--system": "gb200", "--gpus": "4", "--isl": "8192",
            "--max-num-tokens": "32768"}
    argv = []
    for k, v in base.items():
        if k not in args:
            argv += [k, v]
    proc = subprocess.run([sys.executable, "-m", "tensorrt_llm_dwdp", "--log-level", "ERROR",
                           "plan", *argv, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


def test_multimodal_config_reads_its_text_model(tmp_path):
    import json

    from tensorrt_llm_dwdp.model.presets import get_preset
    wrapped = {"architectures": ["SomeVLM"], "vision_config": {"hidden_size": 1152},
               "text_config": get_preset("deepseek-v3")}
    (tmp_path / "config.json").write_text(json.dumps(wrapped))
    m = resolve_model(str(tmp_path))
    assert (m.num_experts, m.hidden, m.num_moe_layers) == (256, 7168, 58)


def test_bundled_config_outside_the_offline_set_cannot_be_compiled():
    from tensorrt_llm_dwdp.plan.costs import AicCosts
    m = resolve_model("moonshotai/Kimi-K2-Instruct")      # bundled, not in DefaultHFModels
    assert m.aic_id is None and m.num_experts == 384
    with pytest.raises(ValueError, match="cannot compile 'moonshotai/Kimi-K2-Instruct' offline"):
        AicCosts(m, load_system("gb200"))
    with pytest.raises(ValueError, match="h100_sxm has no FP4 tensor cores"):
        AicCosts(resolve_model("deepseek-r1-nvfp4"), load_system("h100_sxm"))


def test_default_quant_follows_the_system():
    """Without --quant a named model keeps its format; another is nvfp4 where the system has
    FP4 tensor cores and fp8 where it has not (it used to be refused on H100/H200)."""
    from tensorrt_llm_dwdp.plan.build import default_quant
    h200, gb200 = load_system("h200_sxm"), load_system("gb200")
    assert default_quant("Qwen/Qwen3-235B-A22B", h200) == "fp8"
    assert default_quant("Qwen/Qwen3-235B-A22B", gb200) == "nvfp4"
    assert default_quant("deepseek-r1-nvfp4", h200) is None
    assert default_quant("deepseek-v3", h200, costs="measured") is None
    assert resolve_model("deepseek-r1-fp8", "fp8").quant == "fp8"


def test_dep_only_where_the_group_divides_the_experts():
    """256 experts over 3 GPUs: DWDP3 is planned (it needs no even split), DEP3 is not (the
    database has no EP3 data and expert parallelism shards experts evenly)."""
    from tensorrt_llm_dwdp.plan.planner import candidates
    m, gb = resolve_model("deepseek-r1-nvfp4"), load_system("gb200")
    kinds = {(d.kind, d.size) for d in candidates(_req(gpus=3), m, gb)}
    assert (DWDP, 3) in kinds and ("dep", 3) not in kinds and ("replicated", 1) in kinds
    assert ("dep", 4) in {(d.kind, d.size) for d in candidates(_req(gpus=4), m, gb)}
