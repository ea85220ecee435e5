"""Plug our DWDP manager into a TensorRT-LLM process (imports tensorrt_llm lazily).

Two entry points:

- ``install(llm_args)``: before the LLM is built, in every rank's process. It replaces the
  ``DwdpManager`` name that TensorRT-LLM's executor constructs (in
  ``tensorrt_llm._torch.pyexecutor.dwdp`` and in ``py_executor_creator`` if it imported the
  name) with a factory returning :class:`TrtllmDwdpBridge`; from then on TensorRT-LLM's own call
  sites (MoE construction, weight loading, the executor's per-step warm-up, the scheduler's
  weight view, the per-layer completion) drive OUR manager. ``uninstall()`` restores the names.
- ``attach(model, bridge)``: after weights are loaded, for a model built without DWDP: registers
  every MoE module's expert tensors and switches on upstream's per-layer DWDP hooks on it
  (``enable_dwdp``, ``dwdp_manager``, the two attributes ``ConfigurableMoE.forward_impl`` and
  the MoE scheduler read).
- ``attach_layer_hooks(module, layer_idx, manager, consume)``: for MoE modules that have no
  upstream DWDP call sites: a forward pre-hook fetches ``manager.weights(i)`` and hands it to
  ``consume(module, view)``; a forward hook calls ``manager.done(i)``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.trtllm.bridge import ManagerFactory, TrtllmDwdpBridge
from tensorrt_llm_dwdp.trtllm.config import from_trtllm
from tensorrt_llm_dwdp.trtllm.names import expert_backend, find_moe_modules

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
    knobs (``prefetch_slice_bytes``, ``peer_timeout_s``).
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
        """Built where upstream builds its manager (a class, so upstream's isinstance checks
        against the name still work)."""

        def __init__(self, upstream_config: Any = None, dist: Any = None) -> None:
            # Upstream passes its own DwdpConfig (same fields) and its Distributed object; our
            # manager's communicator forms the group instead.
            del upstream_config, dist
            super().__init__(config, rank=_group_rank(config) if rank is None else rank,
                             manager_factory=factory)
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
    """Register every MoE module of a loaded model with ``bridge`` and enable upstream's DWDP
    call sites on it. Returns the MoE layer indices, in model order. Call on every rank, then
    ``bridge.exchange_all_handles()``."""
    layers = []
    for layer_idx, _name, module in find_moe_modules(model):
        collector = bridge.add_layer(layer_idx)
        collector.register_weights(module)
        for target in {id(module): module, id(expert_backend(module)): expert_backend(module)}.values():
            target.dwdp_handle_collector = collector
        module.dwdp_manager = bridge
        module.dwdp_rank = bridge.dwdp_rank
        module.enable_dwdp = True
        layers.append(layer_idx)
    if not layers:
        raise ValueError(f"no MoE module with w3_w1_weight/w2_weight found in {type(model).__name__}")
    return layers


def attach_layer_hooks(module: nn.Module, layer_idx: int, manager: Any,
                       consume: Callable[[nn.Module, Mapping[str, list[torch.Tensor]]], None]) -> list:
    """Wrap ``module.forward`` with ``weights(layer_idx)`` before and ``done(layer_idx)`` after.

    Returns the two hook handles (``.remove()`` them to detach).
    """
    def before(mod: nn.Module, args: tuple) -> None:
        consume(mod, manager.weights(layer_idx))

    def after(mod: nn.Module, args: tuple, output: Any) -> None:
        manager.done(layer_idx)

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
