"""The README's main job, for real: ranks under mpirun or the TCP rendezvous, CPU shared memory,
and a bitwise comparison with one rank holding all experts."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.multirank


def run_job(tmp_path, *extra):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tensorrt_llm_dwdp", "run", "--device", "cpu", "--max-tokens", "4",
           "--cache-dir", str(tmp_path / "cache"), "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return proc, out


def check_parity(proc, out, ranks):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "parity vs one rank holding all experts: PASS" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parity"]["logits_bitwise_equal"] and summary["parity"]["tokens_equal"]
    assert summary["parity"]["compared_steps"] > 0
    assert len(summary["ranks"]) == ranks
    for r in summary["ranks"]:
        # each rank holds W of E experts plus two buffers of (S-1)P: less than replicated here
        assert 0 < r["expert_bytes_local"] < r["expert_bytes_replicated"]
        assert r["prefetch_bytes"] > 0
    return summary


def test_default_two_ranks_nvfp4_deepseek_bitwise_parity(tmp_path):
    proc, out = run_job(tmp_path)
    summary = check_parity(proc, out, 2)
    assert summary["dwdp_config"]["num_experts_per_worker"] == 8
    assert "prefill tok/s" in proc.stdout


def test_synthetic_long_prompts_chunked_prefill_bitwise_parity(tmp_path):
    """--prompt-lengths / --max-num-tokens: rank 0's 700-token prompt is prefilled in chunks of
    256 (each attending to the cached KV of the earlier ones), on the ranks and the reference."""
    proc, out = run_job(tmp_path, "--num-layers", "2", "--prompt-lengths", "700,40,90",
                        "--max-num-tokens", "256", "--max-tokens", "3")
    summary = check_parity(proc, out, 2)
    assert summary["prompt_lengths"] == [700, 40, 90] and summary["max_num_tokens"] == 256
    assert [r["prefill_tokens"] for r in summary["ranks"]] == [790, 40]
    assert all(0 < r["peak_rss_mib"] < 4096 for r in summary["ranks"])
    assert "chunks of <= 256 tokens" in proc.stdout and "peak RSS MiB" in proc.stdout


def test_four_ranks_tcp_rendezvous_qwen3_bitwise_parity(tmp_path):
    proc, out = run_job(tmp_path, "--preset", "tiny-qwen3-moe", "--num-layers", "2", "--ranks", "4",
                        "--launcher", "tcp")
    summary = check_parity(proc, out, 4)
    assert summary["launcher"] == "tcp"


def test_redundant_layout_with_contention_opt_bitwise_parity(tmp_path):
    proc, out = run_job(tmp_path, "--num-layers", "3", "--experts-per-worker", "10",
                        "--prefetch-experts", "6", "--contention-opt")
    summary = check_parity(proc, out, 2)
    assert summary["dwdp_config"]["contention_opt"] is True


def test_bad_layout_fails_before_launch_naming_the_values(tmp_path):
    proc, _ = run_job(tmp_path, "--num-layers", "2", "--experts-per-worker", "10",
                      "--prefetch-experts", "5", "--no-parity")
    assert proc.returncode != 0
    assert "16" in proc.stderr and "num_prefetch_experts" in proc.stderr


def test_eight_ranks_two_experts_each_bitwise_parity(tmp_path):
    """The 8-rank group of issue 7, on CPU shared memory: E=16, W=P=2."""
    proc, out = run_job(tmp_path, "--num-layers", "3", "--ranks", "8", "--max-tokens", "2")
    summary = check_parity(proc, out, 8)
    assert summary["dwdp_config"]["num_experts_per_worker"] == 2


def test_composite_view_redundant_layout_odd_layers_bitwise_parity(tmp_path):
    """--expert-view composite: every MoE layer read as one [E, ...] tensor per parameter; W > P
    (redundant) and 3 MoE layers (odd: a layer's buffer alternates between steps)."""
    proc, out = run_job(tmp_path, "--expert-view", "composite", "--experts-per-worker", "10",
                        "--prefetch-experts", "6")
    summary = check_parity(proc, out, 2)
    assert summary["dwdp_config"]["expert_view"] == "composite"
    assert "composite view" in proc.stdout


@pytest.mark.parametrize("backend,view", [("torch", "multi"), ("torch-grouped", "composite")])
def test_preshuffled_weights_bitwise_parity(tmp_path, backend, view):
    """--weight-layout preshuffled: the ranks permute their NVFP4 experts at load and prefetch
    them as they are; the torch backends unshuffle them exactly, so the run is bitwise equal to
    the reference, which loads the checkpoint's linear layout."""
    proc, out = run_job(tmp_path, "--num-layers", "2", "--weight-layout", "preshuffled",
                        "--moe-backend", backend, "--expert-view", view)
    summary = check_parity(proc, out, 2)
    assert summary["weight_layout"] == "preshuffled" and summary["moe_backend"] == backend
    assert "preshuffled expert weights" in proc.stdout


@pytest.mark.parametrize("extra", [("--weight-layout", "preshuffled"), ("--moe-backend", "cutedsl")],
                         ids=["preshuffled", "cutedsl-auto"])
def test_a_layout_the_experts_cannot_be_in_fails_before_anything_is_launched(tmp_path, extra):
    """bf16 experts cannot be preshuffled (asked for, or cutedsl's own layout): the run stops
    with the layout's reason before it writes its files or launches a rank."""
    proc, out = run_job(tmp_path, "--num-layers", "2", "--quant", "bf16", *extra)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "'preshuffled' permutes NVFP4 experts; these are 'bf16'" in proc.stderr
    assert "DWDP ranks failed" not in proc.stderr
    assert not (out / "dwdp.yaml").exists() and not (out / "prompts.json").exists()
