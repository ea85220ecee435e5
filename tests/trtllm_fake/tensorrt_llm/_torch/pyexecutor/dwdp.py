"""Upstream's DWDP facade as read (contract.py): the global manager and ``DwdpManager``.

The class here mirrors upstream's construction checks and attributes; its ``setup`` stands where
upstream runs ``setup_dwdp`` (CUDA virtual memory, MNNVL fabric handles: Blackwell), which this
CPU stand-in does not have, so it raises. The adapter replaces this class when it is active.
"""
from __future__ import annotations

from typing import List, Optional

from tensorrt_llm._torch.distributed import MPIDist
from tensorrt_llm._utils import global_mpi_rank, mpi_world_size
from tensorrt_llm.logger import logger

_global_dwdp_manager = None


def set_global_dwdp_manager(manager) -> None:
    global _global_dwdp_manager
    _global_dwdp_manager = manager


def get_global_dwdp_manager():
    return _global_dwdp_manager


class DwdpManager:
    def __init__(self, config, dist, mapping) -> None:
        if not isinstance(dist, MPIDist):
            raise RuntimeError("DWDP requires MPI backend (MPIDist)")
        if not mapping.dwdp_enabled:
            raise RuntimeError("DwdpManager requires mapping.dwdp_enabled (dwdp_size > 1); "
                               f"got dwdp_size={mapping.dwdp_size}")
        if config.num_groups <= 0:
            raise ValueError("num_groups must be positive")
        self.config, self.dist, self._mapping = config, dist, mapping
        self.dwdp_size, self.dwdp_rank = mapping.dwdp_size, mapping.dwdp_rank
        self.num_experts_per_worker = config.num_experts_per_worker
        self.num_groups = config.num_groups
        self.num_prefetch_experts = config.num_prefetch_experts
        self.start_expert_id = self.num_prefetch_experts * self.dwdp_rank
        self.end_expert_id = self.start_expert_id + self.num_experts_per_worker
        self.rank = global_mpi_rank()
        group_id = self.rank // self.dwdp_size
        if group_id >= self.num_groups:
            raise ValueError(f"group_id={group_id} >= num_groups={self.num_groups}")
        if mpi_world_size() < self.dwdp_size * self.num_groups:
            raise ValueError(f"MPI world size is only {mpi_world_size()}")
        self.dwdp_group = None
        self._registered_layers: List[int] = []
        self._weight_manager = None

    def __enter__(self):
        if get_global_dwdp_manager() is not None:
            raise RuntimeError("DwdpManager already registered globally")
        set_global_dwdp_manager(self)
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> bool:
        self.cleanup()
        set_global_dwdp_manager(None)
        return False

    def is_enabled(self) -> bool:
        return self.dwdp_size > 1

    def cleanup(self) -> None:
        self._weight_manager = None

    def add_layer(self, layer_idx: int) -> None:
        if layer_idx in self._registered_layers:
            logger.warning(f"[DwdpManager] Layer {layer_idx} already registered; ignoring")
            return
        self._registered_layers.append(layer_idx)

    def setup(self, model) -> Optional[object]:
        raise RuntimeError("setup_dwdp needs CUDA virtual memory with fabric handles; the CPU "
                           "stand-in of TensorRT-LLM has none (activate tensorrt_llm_dwdp)")

    def prefetch_first_layers(self) -> None:
        raise RuntimeError("DwdpManager.setup() has not been called yet")

    def wait_and_bind(self, backend_module, layer_idx: int) -> None:
        raise RuntimeError("DwdpManager.setup() has not been called yet")

    def record_compute_and_prefetch_next(self, layer_idx: int) -> None:
        raise RuntimeError("DwdpManager.setup() has not been called yet")
