"""load_model with a real DwdpManager across ranks (mpirun or TCP; CPU, shm): every rank loads only its
experts into shared memory, registers them, exchanges, and produces logits bitwise equal to a
single process holding all experts, through prefill and greedy decode (also with the DWDP ranks'
experts preshuffled, against the linear full model)."""
import os
import re
import sys

import pytest

from tensorrt_llm_dwdp.model.hf_names import NVFP4
from tensorrt_llm_dwdp.model.presets import get_preset
from tensorrt_llm_dwdp.model.synthetic import write_synthetic_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SCRIPT = os.path.join(HERE, "_checkpoint_dwdp_rank.py")

pytestmark = pytest.mark.multirank


@pytest.mark.parametrize("n,w,p,quant,layout", [(2, 10, 6, NVFP4, "linear"),
                                                (4, 4, 4, "bf16", "linear"),
                                                (2, 9, 7, NVFP4, "preshuffled"),
                                                (3, 6, 5, "fp8", "linear")])
def test_dwdp_load_matches_full_model(tmp_path, n, w, p, quant, layout):
    preset = "tiny-deepseek-v3-fp8" if quant == "fp8" else "tiny-deepseek-v3"
    write_synthetic_checkpoint(tmp_path, get_preset(preset, num_layers=3), quant=quant,
                               seed=2, shard_bytes=128 << 10)
    from _ranks import run_ranks

    ok, out = run_ranks([sys.executable, SCRIPT, "--checkpoint", str(tmp_path), "--w", str(w),
                         "--p", str(p), "--weight-layout", layout], n, timeout=240)
    results = dict(re.findall(r"^RESULT rank=(\d+) (.*)$", out, re.M))
    assert sorted(int(r) for r in results) == list(range(n)), out[-4000:]
    assert all(v.startswith("OK") for v in results.values()), results
    assert ok, out[-4000:]
    for r in range(n):
        lo = p * r
        assert f"experts=[{lo},{lo + w})" in results[str(r)], results
