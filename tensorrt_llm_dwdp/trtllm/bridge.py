"""Our ``DwdpManager`` behind the interface TensorRT-LLM's PyTorch backend calls today.

TensorRT-LLM's DWDP moved to composite virtual addresses (``_torch/modules/dwdp/``, driven by
the facade ``_torch/pyexecutor/dwdp.py``; see docs/TRTLLM.md for the files and commits read).
Its call sites, and what this bridge does for each:

==============================================  ===============================================
upstream call (who makes it)                     ours
==============================================  ===============================================
``DwdpManager(config, dist, mapping)``           the bridge (``install`` puts it there)
(``py_executor_creator``)
``add_layer(layer_idx=i)``                       remember layer i
(``ConfigurableMoE._register_dwdp``)
``setup(model)`` (``py_executor_creator``,       move each registered layer's expert tensors into
after weight loading)                            memory our composite view maps twice, register,
                                                 ``exchange()``; patch the backends to see all E
                                                 experts (as upstream's ``fixup_moe_backends``)
``prefetch_first_layers()`` (PyExecutor, each    ``start_step()``
step)
``wait_and_bind(backend, i)``                    ``composite_weights(i)`` (the compute stream
(``ConfigurableMoE.forward_impl``, before)       waits for i's prefetch), bound as ``param.data``
``record_compute_and_prefetch_next(i)`` (after)  ``done(i)``
``cleanup()`` / ``__exit__``                     ``close()``
==============================================  ===============================================

The expert tensors (weights, block scales and the per-expert alphas) all travel through the
composite view, so the per-expert alphas need no allgather (upstream's does one). The manager
is built in ``setup`` because it needs the model's expert count (``backend.num_experts``).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch
from torch import nn

from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.trtllm.names import (OURS_TO_TRTLLM, expert_backend, expert_tensors,
                                            find_moe_modules, rebind_quant_scales)

logger = logging.getLogger(__name__)

ManagerFactory = Callable[[DwdpConfig, int], Any]

def _see_all_experts(module: nn.Module, num_experts: int) -> None:
    """What upstream's ``fixup_moe_backends`` sets on the MoE wrapper and its backend, so the
    kernels index all E experts of the bound composite tensors (expert-parallel size 1)."""
    module.ep_size, module.ep_rank = 1, 0
    module.expert_size_per_partition = num_experts
    module.slot_start, module.slot_end, module.num_slots = 0, num_experts, num_experts
    module.initial_local_expert_ids = list(range(num_experts))
    module.initial_global_assignments = list(range(num_experts))


def _install_activation_params(backend: nn.Module) -> None:
    """Upstream re-materializes per-expert activation constants once ``expert_size_per_partition``
    changed; only TensorRT-LLM's backends have them."""
    if backend.__dict__.get("activation") is None:
        return
    from tensorrt_llm._torch.moe.fused_moe.activation import install_activation_params

    install_activation_params(backend)


class TrtllmDwdpBridge:
    """Presents our manager (composite view) as TensorRT-LLM's ``DwdpManager``.

    ``manager_factory(config, num_experts)`` builds our manager (default in ``install``: a
    ``DwdpManager`` over an MPI group); ``config.expert_view`` is forced to ``composite``.
    """

    def __init__(self, config: DwdpConfig, *, rank: int, manager_factory: ManagerFactory) -> None:
        if not config.enabled:
            raise ValueError("TrtllmDwdpBridge needs dwdp_size > 1 (DWDP on)")
        if not 0 <= rank < config.dwdp_size:
            raise ValueError(f"dwdp rank {rank} outside [0, {config.dwdp_size})")
        self.config = dataclasses.replace(config, expert_view="composite")
        self.dwdp_size = config.dwdp_size
        self.dwdp_rank = rank
        self.num_experts_per_worker = config.num_experts_per_worker
        self.num_prefetch_experts = config.num_prefetch_experts
        self._factory = manager_factory
        self.manager: Any = None
        self._registered: list[int] = []
        self._backends: dict[int, nn.Module] = {}

    # ------------------------------------------------------------------ construction
    def is_enabled(self) -> bool:
        return self.dwdp_size > 1

    def add_layer(self, layer_idx: int) -> None:
        """Upstream's ``ConfigurableMoE`` claims layer ``layer_idx`` for DWDP."""
        if self.manager is not None:
            raise RuntimeError(f"MoE layer {layer_idx} added after setup()")
        if layer_idx in self._registered:
            raise ValueError(f"MoE layer {layer_idx} was added to DWDP twice")
        self._registered.append(layer_idx)

    @property
    def registered_layers(self) -> list[int]:
        return sorted(self._registered)

    def setup(self, model: nn.Module) -> "TrtllmDwdpBridge":
        """After weight loading, on every rank: share the registered layers' experts."""
        if self.manager is not None:
            return self
        layers = self.registered_layers
        if not layers:
            raise RuntimeError("DWDP setup: no MoE layer was added (ConfigurableMoE registers "
                               "its layer when DWDP is on and its backend supports it)")
        found = {idx: mod for idx, _, mod in find_moe_modules(model)}
        missing = [i for i in layers if i not in found]
        if missing:
            raise RuntimeError(f"DWDP setup: MoE layers {missing} were added but {type(model).__name__} "
                               f"has no MoE module with those layer_idx (found {sorted(found)})")
        first = expert_backend(found[layers[0]])
        num_experts = first.__dict__.get("num_experts")
        if not isinstance(num_experts, int):
            raise ValueError(f"{type(first).__name__} has no integer num_experts")
        self.config.check_num_experts(num_experts)
        self.manager = self._factory(self.config, num_experts)
        try:
            for layer in layers:
                self._share(layer, found[layer])
            self.manager.exchange()
        except BaseException:
            self.cleanup()
            raise
        for layer in layers:
            for target in {id(m): m for m in (found[layer], self._backends[layer])}.values():
                _see_all_experts(target, num_experts)
            _install_activation_params(self._backends[layer])
        logger.info("DWDP setup: %d layer(s) share %d experts through composite views",
                    len(layers), num_experts)
        return self

    def _share(self, layer: int, module: nn.Module) -> None:
        """Copy the layer's local expert tensors into shareable memory and point the backend's
        parameters at it (the original storage is freed with its last reference)."""
        backend = expert_backend(module)
        w = self.num_experts_per_worker
        tensors = {}
        for ours, t in expert_tensors(backend).items():
            if t.shape[0] != w:
                raise ValueError(
                    f"layer {layer}: {type(backend).__name__}.{OURS_TO_TRTLLM[ours]} holds "
                    f"{t.shape[0]} experts, dwdp_config.num_experts_per_worker is {w}; the MoE "
                    "must load only this rank's slice")
            shared = self.manager.allocate(tuple(t.shape), t.dtype)
            shared.copy_(t)
            self._bind(backend, ours, shared)
            tensors[ours] = shared
        rebind_quant_scales(backend)
        self.manager.register_layer(layer, tensors)
        self._backends[layer] = backend

    @staticmethod
    def _bind(backend: nn.Module, ours: str, tensor: torch.Tensor) -> None:
        attr = OURS_TO_TRTLLM[ours]
        param = backend._parameters.get(attr)
        if param is not None:
            param.data = tensor
        else:
            setattr(backend, attr, tensor)

    # ------------------------------------------------------------------ per step / layer
    def _ready(self, what: str) -> None:
        if self.manager is None:
            raise RuntimeError(f"DwdpManager.{what}: setup() has not been called yet")

    def prefetch_first_layers(self) -> None:
        self._ready("prefetch_first_layers")
        self.manager.start_step()

    def wait_and_bind(self, backend_module: nn.Module, layer_idx: int) -> None:
        """Bind layer ``layer_idx``'s ``[E, ...]`` composite tensors as the backend's weights."""
        self._ready("wait_and_bind")
        backend = expert_backend(backend_module)
        for ours, tensor in self.manager.composite_weights(layer_idx).items():
            self._bind(backend, ours, tensor)

    def record_compute_and_prefetch_next(self, layer_idx: int) -> None:
        self._ready("record_compute_and_prefetch_next")
        self.manager.done(layer_idx)

    # ------------------------------------------------------------------ teardown
    def cleanup(self) -> None:
        if self.manager is not None:
            manager, self.manager = self.manager, None
            manager.close()
        self._backends.clear()

    def __enter__(self) -> "TrtllmDwdpBridge":
        _set_upstream_global(self)
        return self

    def __exit__(self, *exc: object) -> bool:
        try:
            self.cleanup()
        finally:
            _set_upstream_global(None)
        return False


def _set_upstream_global(manager: Any) -> None:
    """Upstream's MoE layers find the manager through this global at construction time."""
    try:
        from tensorrt_llm._torch.pyexecutor import dwdp as upstream
    except ImportError as exc:
        raise ImportError(
            "using TrtllmDwdpBridge as TensorRT-LLM's DWDP manager needs tensorrt_llm "
            "(pip install tensorrt_llm, a release with _torch/pyexecutor/dwdp.py)"
        ) from exc
    upstream.set_global_dwdp_manager(manager)
