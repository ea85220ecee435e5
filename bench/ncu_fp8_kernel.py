#!/usr/bin/env python3
"""Nsight Compute on the sm90 FP8 MoE kernels at one point (the ``fp8-kernels`` suite's optional
``ncu_*`` stages): runs ``bench/profile_fp8_kernel.py MODEL TPE`` under ncu, skipping the first
FC1 (it compiles) and one run's launches, so FC1 and the first FC2 chunk of the second run are
profiled, with the sections and stall metrics below. The exit code is ncu's; ``--print`` shows
the command without running it. Needs ncu on PATH and a CUDA GPU."""
import argparse
import os
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("SpeedOfLight", "Occupancy", "SchedulerStats", "WarpStateStats",
            "MemoryWorkloadAnalysis", "ComputeWorkloadAnalysis")
METRICS = ("regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio,"
           "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,"
           "sm__inst_executed.sum,lts__throughput.avg.pct_of_peak_sustained_elapsed,"
           "dram__throughput.avg.pct_of_peak_sustained_elapsed")


def ncu_command(model: str, tpe: int, skip: int, python: str = sys.executable) -> list[str]:
    """The ncu argv profiling 2 ``Fp8BlockGemm`` launches after ``skip`` of them."""
    cmd = ["ncu", "--clock-control", "none", "-k", "regex:Fp8BlockGemm", "--launch-skip",
           str(skip), "--launch-count", "2"]
    for section in SECTIONS:
        cmd += ["--section", section]
    return cmd + ["--metrics", METRICS, python, os.path.join(HERE, "profile_fp8_kernel.py"),
                  model, str(tpe)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model", help="a kernels.testing.MODELS name, e.g. deepseek_v3")
    ap.add_argument("tpe", type=int, help="tokens per expert")
    ap.add_argument("--print", action="store_true", help="print the ncu command, do not run it")
    args = ap.parse_args(argv)
    sys.path.insert(0, HERE)
    from profile_fp8_kernel import launches_per_run
    from tensorrt_llm_dwdp.kernels.testing import MODELS

    if args.model not in MODELS:
        ap.error(f"unknown model {args.model!r}; known: {', '.join(sorted(MODELS))}")
    if args.tpe < 1:
        ap.error(f"tpe must be >= 1, got {args.tpe}")
    cmd = ncu_command(args.model, args.tpe, 1 + launches_per_run(args.model, args.tpe))
    if args.print:
        print(shlex.join(cmd))
        return 0
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
