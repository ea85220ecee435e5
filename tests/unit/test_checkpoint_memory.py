"""Peak host memory of loading one DWDP rank's expert slice against loading every expert.

Each load runs in a fresh process that resets its resident-set high-water mark after the
imports (``/proc/self/clear_refs``) and reports ``VmHWM`` growth over the RSS at that point; the slice of a 4-rank layout must cost well under half of a full load
(the reader reads only the owned experts' byte ranges, with no memory map).
"""
import json
import os
import subprocess
import sys

import pytest

from tensorrt_llm_dwdp.model.presets import get_preset
from tensorrt_llm_dwdp.model.synthetic import write_synthetic_checkpoint

PROBE = r"""
import json, sys
import torch
from tensorrt_llm_dwdp.model.checkpoint import load_moe_experts, read_config
from tensorrt_llm_dwdp.model.safetensors_io import CheckpointReader
path, start, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg, quant = read_config(path)
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
base = status("VmRSS")
with CheckpointReader(path) as r:
    out = load_moe_experts(r, cfg, quant, range(start, stop), lambda s, d: torch.empty(s, dtype=d))
    nbytes = sum(t.numel() * t.element_size() for layer in out.values() for t in layer.values())
peak = status("VmHWM")
print(json.dumps({"peak_delta_mb": (peak - base) / 1024, "expert_mb": nbytes / 2**20}))
"""


def _probe(path, start, stop):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), str(start), str(stop)],
                         capture_output=True, text=True, timeout=120, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("quant", ["bf16"])
def test_slice_load_peak_memory_is_a_fraction_of_full(tmp_path, quant):
    hf = get_preset("tiny-qwen3-moe", num_layers=2, overrides={
        "hidden_size": 512, "moe_intermediate_size": 256, "num_experts": 64, "head_dim": 32})
    write_synthetic_checkpoint(tmp_path, hf, quant=quant, shard_bytes=64 << 20)
    full = _probe(tmp_path, 0, 64)
    part = _probe(tmp_path, 16, 32)  # rank 1 of a 4-rank disjoint layout
    report = f"full load {full}, one of 4 slices {part}"
    assert abs(full["expert_mb"] - 4 * part["expert_mb"]) < 1e-6, report
    assert full["peak_delta_mb"] >= full["expert_mb"], report
    # no memory map: growth is the loaded bytes plus one expert's read buffers
    for r in (full, part):
        assert r["peak_delta_mb"] < 1.25 * r["expert_mb"] + 16, report
    assert part["peak_delta_mb"] < 0.5 * full["peak_delta_mb"], report
    print(report)
