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

from bench.fp8_linears import LINEARS, MLA, totals  # noqa: E402


def test_layer_totals_sum_the_medians():
    results = [{"linear": name, "tokens": 16384, "bf16": {"median_ms": 2.0 * (i + 1)},
                "fp8": {"median_ms": 1.0 * (i + 1)}} for i, (name, _, _) in enumerate(LINEARS)]
    out = totals(results, 16384)
    dense = MLA + ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    want = sum(i + 1 for i, (name, _, _) in enumerate(LINEARS) if name in dense)
    assert out["dense_layer"] == {"bf16_ms": 2.0 * want, "fp8_ms": 1.0 * want, "speedup": 2.0}
    assert set(out) == {"dense_layer", "moe_layer_mla_shared"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_without_the_vendor_gemm(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "fp8_linears.py"),
                           "--out", str(tmp_path / "x.json")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "blockwise scaled GEMM" in proc.stderr
    assert not (tmp_path / "x.json").exists()
