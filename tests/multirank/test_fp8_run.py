"""``run --quant fp8`` on CPU ranks: an FP8 block-128 checkpoint (every projection linear and
routed expert in e4m3 with 128x128 scales) prefills and decodes over DWDP with logits bitwise
equal to one rank holding all experts, with 2 and 3 ranks, composite and multi views, and both
torch backends; cutedsl is refused before any rank starts."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.multirank


def run_job(tmp_path, *extra):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tensorrt_llm_dwdp", "run", "--quant", "fp8", "--device", "cpu",
           "--max-tokens", "3", "--num-layers", "3", "--cache-dir", str(tmp_path / "cache"),
           "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return proc, out


def check_parity(proc, out, ranks, view):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "parity vs one rank holding all experts: PASS" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parity"]["logits_bitwise_equal"] and summary["parity"]["tokens_equal"]
    assert summary["parity"]["compared_steps"] > 0
    assert summary["dwdp_config"]["expert_view"] == view
    assert len(summary["ranks"]) == ranks
    for r in summary["ranks"]:
        assert 0 < r["expert_bytes_local"] < r["expert_bytes_replicated"]
        assert r["prefetch_bytes"] > 0
    with open(summary["model"] + "/config.json") as f:
        assert json.load(f)["quantization_config"]["quant_method"] == "fp8"
    return summary


@pytest.mark.parametrize("ranks, view, extra", [
    (2, "composite", ()),
    (2, "multi", ()),
    (3, "composite", ("--experts-per-worker", "6", "--prefetch-experts", "5")),
    (3, "multi", ("--experts-per-worker", "6", "--prefetch-experts", "5")),
])
def test_deepseek_fp8_bitwise_parity(tmp_path, ranks, view, extra):
    proc, out = run_job(tmp_path, "--ranks", str(ranks), "--expert-view", view, *extra)
    summary = check_parity(proc, out, ranks, view)
    assert "tiny-deepseek-v3-fp8" in summary["model"]


def test_qwen3_fp8_torch_grouped_composite_bitwise_parity(tmp_path):
    proc, out = run_job(tmp_path, "--preset", "tiny-qwen3-moe-fp8", "--ranks", "2",
                        "--expert-view", "composite", "--moe-backend", "torch-grouped")
    check_parity(proc, out, 2, "composite")


def test_cutedsl_refused_before_launch(tmp_path):
    proc, out = run_job(tmp_path, "--moe-backend", "cutedsl", "--no-parity")
    assert proc.returncode == 1
    assert "no FP8 expert kernel yet" in proc.stderr
    assert not (out / "dwdp.yaml").exists()
