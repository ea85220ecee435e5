#!/usr/bin/env python3
"""What a device run ran on, printed at its start so every log says it: GPUs and driver, the
versions that decide behaviour (torch, cuDNN, cuda-bindings, the CUTLASS DSL), what the CuTeDSL
backend lacks, the CUDA VMM granularity, /dev/shm and host memory, and whether mpirun is there.
Never fails: a part that cannot be read prints why."""
from __future__ import annotations

import importlib.metadata
import shutil
import subprocess


def _line(label: str, read) -> None:
    try:
        print(f"{label}: {read()}")
    except Exception as exc:  # a report of the machine, not a check: say why and go on
        print(f"{label}: unavailable ({type(exc).__name__}: {exc})")


def main() -> int:
    import torch

    _line("gpus", lambda: subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,"
         "pcie.link.gen.current,pcie.link.width.current", "--format=csv,noheader"],
        capture_output=True, text=True, check=True).stdout.strip())
    _line("torch", lambda: f"{torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
                           f"{torch.cuda.device_count()} CUDA device(s)")
    for package in ("cuda-bindings", "nvidia-cutlass-dsl"):
        _line(package, lambda p=package: importlib.metadata.version(p))

    def cutedsl() -> str:
        from tensorrt_llm_dwdp.moe.backends import _cutedsl_missing
        return "ready" if not (missing := _cutedsl_missing()) else "missing " + "; ".join(missing)

    def vmm() -> str:
        from tensorrt_llm_dwdp.dwdp.vmm import GpuVmm
        v = GpuVmm("cuda")
        return f"minimum {v.minimum_granularity} B, recommended {v.granularity} B"

    _line("cutedsl backend", cutedsl)
    if torch.cuda.is_available():
        _line("CUDA VMM granularity", vmm)
    _line("/dev/shm free GiB", lambda: round(shutil.disk_usage("/dev/shm").free / 2**30, 1))
    _line("host memory", lambda: next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split(":")[1].strip())
    _line("mpirun", lambda: shutil.which("mpirun") or "not found (the TCP rendezvous is used)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
