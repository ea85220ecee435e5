"""The main job with host tiers, for real (TCP launch, CPU shared memory): a rank SIGKILLed
mid-run while the survivors fail over to the host store and finish bitwise equal to one rank
holding all experts; offload of 25% and 75% of each rank's own experts, bitwise too, in the
composite view (the offloaded experts come onto pool pages) and the multi view."""
import glob
import json
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.multirank


def run_job(tmp_path, *extra):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tensorrt_llm_dwdp", "run", "--device", "cpu", "--max-tokens", "4",
           "--cache-dir", str(tmp_path / "cache"), "--out", str(out), *extra]
    before = set(glob.glob("/dev/shm/trtllm_dwdp_*"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return proc, out, sorted(set(glob.glob("/dev/shm/trtllm_dwdp_*")) - before)


def test_killed_rank_survivors_fail_over_and_stay_bitwise(tmp_path):
    """The issue's command (with --max-tokens 4 to keep CI short)."""
    proc, out, left = run_job(tmp_path, "--ranks", "3", "--experts-per-worker", "6",
                              "--prefetch-experts", "5", "--host-backup", "--fail-rank", "1",
                              "--fail-at-step", "2")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "rank 1: killed at its step 2 (--fail-rank), exit code -9" in proc.stdout
    for r in (0, 2):
        assert re.search(rf"^DWDP rank {r}: failover: peer 1 is down \(process \d+ ", proc.stdout,
                         re.M), proc.stdout
    assert "parity vs one rank holding all experts: PASS" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["killed"] == [1] and [r["rank"] for r in summary["ranks"]] == [0, 2]
    assert summary["parity"]["logits_bitwise_equal"] and summary["parity"]["compared_steps"] > 0
    assert all(r["host_prefetch_bytes"] > 0 for r in summary["ranks"])
    assert not left, left


@pytest.mark.parametrize("host_experts, view", [(2, "composite"), (6, "composite"),
                                                (6, "multi")])  # 25% and 75% of W = 8
def test_offload_bitwise_parity(tmp_path, host_experts, view):
    proc, out, left = run_job(tmp_path, "--ranks", "2", "--host-experts-per-worker",
                              str(host_experts), "--expert-view", view)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "parity vs one rank holding all experts: PASS" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dwdp_config"]["host_experts_per_worker"] == host_experts
    assert summary["dwdp_config"]["expert_view"] == view
    for r in summary["ranks"]:
        # H of its own 8 experts per layer come over the host link every time, plus whatever
        # part of the peer's slice the peer keeps in host memory
        assert r["host_prefetch_bytes"] > 0
        assert r["host_prefetch_bytes"] < r["prefetch_bytes"]
    assert not left, left


@pytest.mark.parametrize("extra", [
    ("--ranks", "3", "--experts-per-worker", "6", "--prefetch-experts", "5", "--host-backup",
     "--fail-rank", "1", "--fail-at-step", "2"),
    ("--ranks", "2", "--host-experts-per-worker", "2"),
], ids=["failover", "offload"])
def test_preshuffled_weights_through_the_host_store_bitwise(tmp_path, extra):
    """--weight-layout preshuffled with host tiers: the store holds the ranks' shuffled experts
    (failover reads a dead peer's from it; offloaded own experts are shuffled at load too), so
    the run stays bitwise equal to the linear reference."""
    proc, out, left = run_job(tmp_path, "--num-layers", "2", "--weight-layout", "preshuffled",
                              *extra)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "parity vs one rank holding all experts: PASS" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weight_layout"] == "preshuffled"
    assert all(r["host_prefetch_bytes"] > 0 for r in summary["ranks"])
    assert not left, left


def test_host_store_that_does_not_fit_fails_before_start(tmp_path):
    env_script = ("import sys; from tensorrt_llm_dwdp.dwdp import host_store as hs;"
                  "hs.host_memory = lambda path=hs.SHM_DIR: {'shm_free': 1000, 'mem_available': -1};"
                  "from tensorrt_llm_dwdp.cli import main; sys.exit(main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", env_script, "run", "--device", "cpu", "--ranks", "2",
           "--host-backup", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "o2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert re.search(r"needs 0\.\d\d GiB of POSIX shared memory but /dev/shm has 0\.00 GiB free",
                     proc.stderr), proc.stderr[-2000:]
    assert "launched" not in proc.stderr
