"""``run --quant fp8`` on CPU ranks: an FP8 block-128 checkpoint (every projection linear and
routed expert in e4m3 with 128x128 scales) prefills and decodes over DWDP with logits bitwise
equal to one rank holding all experts, with 2 and 3 ranks, composite and multi views, both
torch backends, host tiers (offloaded own experts, the node's host store, failover to it when a
rank dies): DWDP moves the e4m3 weights and their scales as whole experts' bytes, unchanged.
cutedsl is refused before any rank starts."""
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


def test_host_tiers_carry_fp8_experts(tmp_path):
    proc, out = run_job(tmp_path, "--ranks", "2", "--host-experts-per-worker", "2",
                        "--host-backup")
    summary = check_parity(proc, out, 2, "composite")
    assert summary["dwdp_config"]["host_experts_per_worker"] == 2


def test_failover_to_the_host_store_with_fp8_experts(tmp_path):
    proc, out = run_job(tmp_path, "--ranks", "2", "--host-backup", "--fail-rank", "1",
                        "--fail-at-step", "2", "--max-tokens", "4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "now come from the host store" in proc.stdout + proc.stderr
    assert "parity vs one rank holding all experts: PASS" in proc.stdout


def test_qwen3_fp8_torch_grouped_composite_bitwise_parity(tmp_path):
    proc, out = run_job(tmp_path, "--preset", "tiny-qwen3-moe-fp8", "--ranks", "2",
                        "--expert-view", "composite", "--moe-backend", "torch-grouped")
    check_parity(proc, out, 2, "composite")


def test_cutedsl_refused_before_launch(tmp_path):
    proc, out = run_job(tmp_path, "--moe-backend", "cutedsl", "--no-parity")
    assert proc.returncode == 1
    assert "no FP8 expert kernel yet" in proc.stderr
    assert not (out / "dwdp.yaml").exists()
