"""bench/tiers.py as a CPU dry run (tiny preset, shm store): every subcommand runs the code the
device runs and reports its figures; the failover run kills rank 1 and both survivors report a
failover, a retried first served step and outputs bitwise equal across steps."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "bench", "tiers.py")
TINY = ["--device", "cpu", "--preset", "tiny-deepseek-v3"]

pytestmark = pytest.mark.multirank


def _run(tmp_path, *args):
    out = tmp_path / "out.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, SCRIPT, *args, *TINY, "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_h2d_and_offload_dry_run(tmp_path):
    h2d = _run(tmp_path, "h2d", "--experts", "16", "--host-experts", "6", "--layers", "3")
    # composite (the default): the H experts' bytes on pool pages; the part sharing the own
    # allocation's last page (at most a 4 KiB page per tensor, 6 NVFP4 tensors) is an edge,
    # copied once at the exchange
    assert h2d["expert_view"] == "composite" and h2d["prefetch_gbps"] > 0
    assert 6 * h2d["expert_bytes"] - 6 * 4096 <= h2d["prefetch_bytes_per_layer"] \
        <= 6 * h2d["expert_bytes"]
    h2d = _run(tmp_path, "h2d", "--experts", "16", "--host-experts", "6", "--layers", "3",
               "--expert-view", "multi")
    assert h2d["prefetch_gbps"] > 0 and h2d["prefetch_bytes_per_layer"] == 6 * h2d["expert_bytes"]
    off = _run(tmp_path, "offload", "--experts", "16", "--host-experts", "6", "--layers", "3",
               "--tokens", "32", "96", "--iters", "1")
    assert off["tokens"] == [32, 96] and set(off["modes"]) == {"resident", "prefetch"}
    assert all(r["bitwise_equal_resident"] for r in off["modes"]["prefetch"])
    assert off["host_bytes_copied"]["prefetch"] > 0


def test_failover_dry_run(tmp_path):
    res = _run(tmp_path, "failover", "--experts", "15", "--layers", "2", "--tokens", "32",
               "--kill-at", "3", "--after", "2", "--backend", "torch", "--timeout", "60",
               "--work", str(tmp_path / "work"))
    assert res["returncodes"] == [0, -9, 0] and res["launch_ok"], res
    for r in ("rank0", "rank2"):
        rep = res[r]
        assert rep["failovers"] == 1 and rep["bitwise_equal_every_step"], rep
        assert rep["failover_ms_kill_to_first_served_step"] > 0, rep
        assert rep["step_ms_pcie"] > 0 and rep["pcie_over_ipc_step"] > 0, rep
