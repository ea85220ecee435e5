"""bench/expert_views.py on 2 CPU ranks at a tiny scale: every phase ran, every output is
bitwise the reference's, the composite/multi ratio and the prefetch figures are there, and
torch-grouped (composite only) stays within bf16 tolerance of the torch reference."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.multirank
def test_expert_views_bench_tiny_cpu(tmp_path):
    from _ranks import run_ranks

    out = tmp_path / "views.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "expert_views.py"), "--device", "cpu",
           "--backends", "torch,torch-grouped", "--experts", "16", "--hidden", "64",
           "--inter", "32", "--w", "10", "--p", "6", "--tokens", "48", "--layers", "3",
           "--warmup", "1", "--steps", "2", "--out", str(out),
           "--timeout", "240"]  # peer timeout: generous for a loaded 2-core machine
    ok, log = run_ranks(cmd, 2, timeout=600)  # mpirun where installed, else TCP
    assert ok, log[-6000:]
    report = json.loads(out.read_text())
    torch_ranks, grouped_ranks = report["backends"]["torch"], report["backends"]["torch-grouped"]
    for r in torch_ranks:
        assert "error" not in r, r
        assert {"reference", "multi_0", "composite_0", "multi_1", "composite_1"} <= set(r)
        assert r["all_bitwise_equal"] and r["composite_over_multi"] > 0
        for key in ("multi_0", "composite_0"):
            assert r[key]["prefetch_gbps"] > 0 and r[key]["bytes_per_prefetch"] > 0
    for r in grouped_ranks:
        assert "error" not in r, r
        assert "multi_0" not in r and r["composite_0"]["bitwise_equal"]
        assert r["max_rel_diff_vs_first_backend"] < 2e-2
