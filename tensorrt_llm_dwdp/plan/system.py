"""A cluster's GPU and interconnect figures, read from aiconfigurator-core's ``systems/*.yaml``."""
from __future__ import annotations

import os
from dataclasses import dataclass

import yaml

from tensorrt_llm_dwdp.plan.model import aic_model_configs_dir


def systems_dir() -> str:
    return os.path.join(os.path.dirname(aic_model_configs_dir()), "systems")


@dataclass(frozen=True)
class System:
    """Units: bytes/s, bytes, FLOP/s."""

    name: str
    hbm_bw: float
    mem_capacity: int
    reserved_mem: int           # runtime + NCCL memory the system file sets aside
    flops: dict[str, float]     # bf16 / fp8 / fp4 tensor-core peaks
    nvlink_bw: float            # per GPU, one direction, inside the NVLink domain
    nvlink_domain: int          # GPUs one NVLink fabric joins (a node, or an NVL72 rack)

    def peak_flops(self, quant: str) -> float:
        key = {"nvfp4": "fp4", "fp8": "fp8"}.get(quant, "bfloat16")
        return self.flops.get(key) or self.flops["bfloat16"]


def available_systems() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(systems_dir())
                  if f.endswith(".yaml") and os.path.isdir(os.path.join(systems_dir(), "data", f[:-5])))


def load_system(name: str) -> System:
    """The system called ``name`` (a ``systems/<name>.yaml`` of aiconfigurator-core)."""
    if name not in available_systems():
        raise ValueError(f"unknown system {name!r}; choose one of {', '.join(available_systems())}")
    with open(os.path.join(systems_dir(), f"{name}.yaml")) as f:
        spec = yaml.safe_load(f)
    gpu, node, misc = spec["gpu"], spec["node"], spec.get("misc", {})
    flops = {k[: -len("_tc_flops")]: float(v) for k, v in gpu.items() if k.endswith("_tc_flops")}
    domain = int(node.get("num_gpus_per_rack") or node["num_gpus_per_node"])
    nccl = max((misc.get("nccl_mem") or {0: 0}).values())
    return System(name=name, hbm_bw=float(gpu["mem_bw"]), mem_capacity=int(gpu["mem_capacity"]),
                  reserved_mem=int(misc.get("other_mem", 0)) + int(nccl), flops=flops,
                  nvlink_bw=float(node["intra_node_bw"]), nvlink_domain=domain)
