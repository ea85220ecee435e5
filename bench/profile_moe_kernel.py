"""Run the sm90 FC1 and FC2 kernels once each on one routing, for a profiler (ncu) to read
(random experts, preshuffled before the kernels run: the layout they read).

Usage: ncu --clock-control none -k regex:W4A16Rs python3 bench/profile_moe_kernel.py MODEL TPE
(The first launch of each kernel compiles; a second call runs it again for ``-s`` skipping.)
``--ncu`` as the last argument runs exactly that under ncu: it skips the first call's launches
and profiles the second call's FC1 and first FC2 chunk with the sections ``NCU_SECTIONS`` lists.
"""
import os
import subprocess
import sys

import torch

from tensorrt_llm_dwdp.kernels.compile_cache import CompileCache
from tensorrt_llm_dwdp.kernels.sm90.fc1_swiglu import fc1_gather_swiglu
from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import fc2_finalize
from tensorrt_llm_dwdp.kernels.testing import model_experts

try:
    from bench.moe_kernels import tables, uniform_point
except ImportError:  # run as a script from the repo root: bench/ is sys.path[0]
    from moe_kernels import tables, uniform_point


NCU_SECTIONS = ("SpeedOfLight", "Occupancy", "SchedulerStats", "WarpStateStats",
                "MemoryWorkloadAnalysis", "ComputeWorkloadAnalysis", "InstructionStats")
NCU_METRICS = ("regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio,"
               "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,"
               "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,"
               "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,"
               "sm__pipe_shared_cycles_active.avg.pct_of_peak_sustained_active,"
               "sm__inst_executed_pipe_alu.sum,sm__inst_executed_pipe_fma.sum,"
               "sm__inst_executed_pipe_lsu.sum,sm__inst_executed.sum,"
               "lts__t_sectors_srcunit_tex_op_read.sum,"
               "lts__throughput.avg.pct_of_peak_sustained_elapsed,"
               "dram__throughput.avg.pct_of_peak_sustained_elapsed,"
               "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum")


def under_ncu(model: str, tpe: str) -> int:
    """Profile the second call: skip the first call's FC1 and its FC2 chunks (it compiles)."""
    from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import chunk_blocks
    from tensorrt_llm_dwdp.kernels.testing import MODELS

    h, _, _, k = MODELS[model]
    skip = 1 + -(-(h // 64) // chunk_blocks(h, k))
    cmd = ["ncu", "--clock-control", "none", "-k", "regex:W4A16Rs", "--launch-skip", str(skip),
           "--launch-count", "2"]
    for section in NCU_SECTIONS:
        cmd += ["--section", section]
    cmd += ["--metrics", NCU_METRICS, sys.executable, os.path.abspath(__file__), model, tpe]
    return subprocess.run(cmd).returncode


def main() -> int:
    if sys.argv[-1] == "--ncu":
        return under_ncu(sys.argv[1], sys.argv[2])
    model, tpe = sys.argv[1], int(sys.argv[2])
    weights = model_experts(model, seed=1)
    ids, tw, x, bn, plan = uniform_point(model, tpe)
    w13, w2 = tables(weights)
    cache = CompileCache()
    for _ in range(2):
        h = fc1_gather_swiglu(cache, x, plan.gather_index, plan.tile_expert, w13, bn,
                              tile_count=plan.tile_count)
        fc2_finalize(cache, h, plan.slot_index, plan.tile_expert, ids, tw, w2, bn,
                     tile_count=plan.tile_count)
    torch.cuda.synchronize()
    print(f"{model} tpe={tpe} bn={bn} ran FC1 and FC2 twice", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
