"""Plug our DWDP manager into a TensorRT-LLM process (imports tensorrt_llm lazily).

- ``install(llm_args)``: before the LLM is built, in every rank's process. It replaces the
  ``DwdpManager`` name that TensorRT-LLM's executor constructs (in
  ``tensorrt_llm._torch.pyexecutor.dwdp`` and in ``py_executor_creator`` if it imported the
  name) with a class building :class:`TrtllmDwdpBridge`; from then on TensorRT-LLM's own call
  sites (``add_layer`` at MoE construction, ``setup(model)`` after loading, the executor's
  per-step ``prefetch_first_layers``, ``wait_and_bind`` / ``record_compute_and_prefetch_next``
  around every MoE layer) drive OUR manager. ``uninstall()`` restores the names.
- ``attach(model, bridge)``: for a model built without DWDP, after loading: adds every MoE
  module to ``bridge``, switches on upstream's per-layer DWDP hooks on it (``enable_dwdp``,
  ``dwdp_manager``, which ``ConfigurableMoE.forward_impl`` reads) and runs ``bridge.setup``.
- ``attach_layer_hooks(module, layer_idx, bridge)``: for MoE modules without upstream DWDP call
  sites: a forward pre-hook binds the composite weights, a forward hook records the layer done.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.trtllm.bridge import ManagerFactory, TrtllmDwdpBridge
from tensorrt_llm_dwdp.trtllm.config import from_trtllm
from tensorrt_llm_dwdp.trtllm.names import find_moe_modules

logger = logging.getLogger(__name__)

UPSTREAM_MANAGER_MODULES = (
    "tensorrt_llm._torch.pyexecutor.dwdp",
    "tensorrt_llm._torch.pyexecutor.py_executor_creator",
)


def default_manager_factory(device: torch.device | str | None = None) -> ManagerFactory:
    """Our ``DwdpManager`` over an MPI group (upstream launches DWDP ranks with mpirun)."""

    def make(config: DwdpConfig, num_experts: int) -> Any:
        from tensorrt_llm_dwdp.comm.mpi import MpiGroupComm
        from tensorrt_llm_dwdp.dwdp.manager import DwdpManager

        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else device
        return DwdpManager(config, num_experts, comm=MpiGroupComm(config), device=dev)

    return make


def _group_rank(config: DwdpConfig) -> int:
    from mpi4py import MPI

    return config.group_of(MPI.COMM_WORLD.Get_rank())[1]


@dataclass
class Installation:
    """What ``install`` replaced; ``uninstall()`` puts it back."""

    config: DwdpConfig
    replaced: dict[str, Any] = field(default_factory=dict)
    bridges: list[TrtllmDwdpBridge] = field(default_factory=list)

    def uninstall(self) -> None:
        import importlib

        for module_name, original in self.replaced.items():
            setattr(importlib.import_module(module_name), "DwdpManager", original)
        self.replaced.clear()


def install(llm_args: Any, *, manager_factory: ManagerFactory | None = None,
            rank: int | None = None, **ours: Any) -> Installation | None:
    """Make TensorRT-LLM build our manager wherever it would build its own.

    ``llm_args``: TensorRT-LLM's ``TorchLlmArgs`` (or anything with ``dwdp_config``, or that
    section itself as a mapping). Returns None when DWDP is off. ``ours``: our extra config
    knobs (``prefetch_slice_bytes``, ``peer_timeout_s``, ``view_page_bytes``, ``view_handles``).
    """
    import importlib

    section = llm_args if isinstance(llm_args, Mapping) else getattr(llm_args, "dwdp_config")
    config = from_trtllm(section, **ours)
    if not config.enabled:
        logger.info("dwdp_config is off; TensorRT-LLM runs unchanged")
        return None
    factory = manager_factory or default_manager_factory()
    installation = Installation(config)

    class InstalledBridge(TrtllmDwdpBridge):
        """Built where upstream builds its manager, ``DwdpManager(config, dist, mapping)`` (a
        class, so upstream's isinstance checks against the name still work)."""

        def __init__(self, upstream_config: Any = None, dist: Any = None,
                     mapping: Any = None) -> None:
            # Upstream passes its own DwdpConfig (same fields), its Distributed object and its
            # Mapping; our manager's communicator forms the group, the mapping gives the rank.
            del upstream_config, dist
            group_rank = rank
            if group_rank is None:
                group_rank = mapping.dwdp_rank if mapping is not None else _group_rank(config)
            super().__init__(config, rank=group_rank, manager_factory=factory)
            installation.bridges.append(self)

    for module_name in UPSTREAM_MANAGER_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            if module_name == UPSTREAM_MANAGER_MODULES[0]:
                installation.uninstall()
                raise ImportError(
                    "tensorrt_llm_dwdp.trtllm.install needs TensorRT-LLM with DWDP support "
                    "(tensorrt_llm/_torch/pyexecutor/dwdp.py); pip install tensorrt_llm"
                ) from exc
            continue
        if hasattr(module, "DwdpManager"):
            installation.replaced[module_name] = module.DwdpManager
            module.DwdpManager = InstalledBridge
    return installation


def attach(model: nn.Module, bridge: TrtllmDwdpBridge) -> list[int]:
    """Add every MoE module of a loaded model to ``bridge``, enable upstream's DWDP call sites
    on it, and run ``bridge.setup(model)`` (collective: every rank calls it). Returns the MoE
    layer indices, in model order."""
    layers = []
    for layer_idx, _name, module in find_moe_modules(model):
        bridge.add_layer(layer_idx=layer_idx)
        module.dwdp_manager = bridge
        module.enable_dwdp = True
        layers.append(layer_idx)
    if not layers:
        raise ValueError(f"no MoE module with w3_w1_weight/w2_weight found in {type(model).__name__}")
    bridge.setup(model)
    return layers


def attach_layer_hooks(module: nn.Module, layer_idx: int, bridge: TrtllmDwdpBridge) -> list:
    """Bind the composite weights before ``module.forward`` and record the layer done after.

    Returns the two hook handles (``.remove()`` them to detach).
    """
    def before(mod: nn.Module, args: tuple) -> None:
        bridge.wait_and_bind(mod, layer_idx)

    def after(mod: nn.Module, args: tuple, output: Any) -> None:
        bridge.record_compute_and_prefetch_next(layer_idx)

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
