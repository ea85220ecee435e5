"""bench/fp8_linears.py without a GPU: the layer totals and the goal are computed from the
per-linear medians, and the script refuses to run (exit 1, saying why) where torch has no
blockwise scaled GEMM."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from bench.fp8_linears import LAYERS, UNITS, totals  # noqa: E402


def test_layer_totals_sum_the_medians():
    results = [{"unit": name, "tokens": 16384, "bf16": {"median_ms": 2.0 * (i + 1)},
                "fp8": {"median_ms": 1.0 * (i + 1)}} for i, (name, _) in enumerate(UNITS)]
    out = totals(results, 16384)
    want = sum(i + 1 for i, (name, _) in enumerate(UNITS) if name in LAYERS["dense_layer"])
    assert out["dense_layer"] == {"bf16_ms": 2.0 * want, "fp8_ms": 1.0 * want, "speedup": 2.0}
    assert set(out) == {"dense_layer", "moe_layer_mla_shared"}
    # every projection of one input is in one unit, and every unit's projections share K
    assert all(len({k for _, _, k in projs}) == 1 for _, projs in UNITS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_without_the_vendor_gemm(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "fp8_linears.py"),
                           "--out", str(tmp_path / "x.json")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "blockwise scaled GEMM" in proc.stderr
    assert not (tmp_path / "x.json").exists()
