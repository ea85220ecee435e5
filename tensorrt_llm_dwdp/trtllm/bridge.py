"""Our ``DwdpManager`` behind the interface TensorRT-LLM's PyTorch backend calls today.

TensorRT-LLM's DWDP (``_torch/pyexecutor/dwdp.py``, a facade over ``_torch/modules/dwdp/``) is
called at these points; ``contract.py`` lists each with the upstream file and commit read.

==================================================  ===========================================
upstream call (who makes it)                         ours
==================================================  ===========================================
``DwdpManager(config=, dist=, mapping=)``            ``install.TrtllmDwdpManager`` (a bridge)
(``py_executor_creator``), then ``__enter__()``      registered as upstream's global manager
``start_expert_id``, ``num_experts_per_worker``,     set at construction from the config and the
``dwdp_size`` (``MoE._init_dwdp_expert_layout``,     group rank: the layer loads experts
every MoE layer, before ``add_layer``)               ``[P*r, P*r + W)``
``add_layer(layer_idx=i)``                           remember layer i (a duplicate warns)
(``ConfigurableMoE._register_dwdp``)
``setup(model)`` (``py_executor_creator``, after     move each registered layer's per-expert
loading)                                             tensors into memory our composite view maps
                                                     twice, register, ``exchange()``; patch the
                                                     backends to see all E experts
warm-up forwards, then per step                      :class:`protocol.StepAdapter`: our strict
``prefetch_first_layers()`` (``PyExecutor``) and     step order kept through warm-up, skipped
per layer ``wait_and_bind(backend, i)`` /            layers and forwards that raise
``record_compute_and_prefetch_next(i)``
(``ConfigurableMoE.forward_impl``)
``cleanup()`` / ``__exit__`` (executor shutdown)     ``close()`` (idempotent)
==================================================  ===========================================

Every per-expert tensor (weights, block scales, alphas and whatever else upstream's name rule
finds) travels through the composite view, so nothing needs the allgather upstream does for the
small ones. The manager is built in ``setup`` because it needs the model's expert count
(``backend.num_experts``); the group communicator exists from construction, as upstream's.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

from torch import nn

from tensorrt_llm_dwdp.comm.base import GroupComm
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.trtllm.names import (bind_tensor, expert_backend, expert_tensors,
                                            find_moe_modules, rebind_quant_scales)
from tensorrt_llm_dwdp.trtllm.protocol import StepAdapter

logger = logging.getLogger(__name__)

#: ``factory(config, num_experts, comm)`` -> our manager; ``comm`` is the group communicator the
#: bridge was built with (None when the factory forms its own), owned by the manager from then on.
ManagerFactory = Callable[[DwdpConfig, int, "GroupComm | None"], Any]


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

    ``rank``: this process's rank in its DWDP group. ``manager_factory(config, num_experts,
    comm)`` builds our manager at ``setup``; ``config.expert_view`` is forced to ``composite``.
    """

    def __init__(self, config: DwdpConfig, *, rank: int, manager_factory: ManagerFactory,
                 comm: GroupComm | None = None) -> None:
        if not config.enabled:
            raise ValueError("TrtllmDwdpBridge needs dwdp_size > 1 (DWDP on)")
        if not 0 <= rank < config.dwdp_size:
            raise ValueError(f"dwdp rank {rank} outside [0, {config.dwdp_size})")
        if comm is not None and (comm.rank, comm.size) != (rank, config.dwdp_size):
            raise ValueError(f"the group communicator is rank {comm.rank} of {comm.size}; the "
                             f"bridge was given rank {rank} of dwdp_size {config.dwdp_size}")
        self.config = dataclasses.replace(config, expert_view="composite")
        self.dwdp_size = config.dwdp_size
        self.dwdp_rank = rank
        self.num_groups = config.num_groups
        self.num_experts_per_worker = config.num_experts_per_worker
        self.num_prefetch_experts = config.num_prefetch_experts
        # Read by upstream's MoE layers while the model is built (contract.py).
        self.start_expert_id = config.num_prefetch_experts * rank
        self.end_expert_id = self.start_expert_id + config.num_experts_per_worker
        self._factory = manager_factory
        self._comm = comm
        self.manager: Any = None
        self.steps: StepAdapter | None = None
        self._registered: list[int] = []
        self._backends: dict[int, nn.Module] = {}

    # ------------------------------------------------------------------ construction
    def is_enabled(self) -> bool:
        return self.dwdp_size > 1

    def add_layer(self, layer_idx: int) -> None:
        """Upstream's ``ConfigurableMoE`` claims layer ``layer_idx`` for DWDP."""
        if self.manager is not None:
            raise RuntimeError(f"MoE layer {layer_idx} added after setup(): TensorRT-LLM adds "
                               "its MoE layers while the model is built, before setup(model)")
        if layer_idx in self._registered:
            logger.warning("DwdpManager: layer %d already registered; ignoring", layer_idx)
            return
        self._registered.append(layer_idx)

    @property
    def registered_layers(self) -> list[int]:
        return sorted(self._registered)

    def setup(self, model: nn.Module) -> "TrtllmDwdpBridge":
        """After weight loading, on every rank of the group: share the registered layers'
        experts (collective). A second call returns at once."""
        if self.manager is not None:
            return self
        layers = self.registered_layers
        if not layers:
            raise RuntimeError("DWDP setup: no MoE layer was added (ConfigurableMoE registers "
                               "its layer while the model is built, when DWDP is on and its "
                               "backend supports it)")
        found = {idx: mod for idx, _, mod in find_moe_modules(model)}
        missing = [i for i in layers if i not in found]
        if missing:
            raise RuntimeError(f"DWDP setup: MoE layers {missing} were added but "
                               f"{type(model).__name__} has no MoE module with those layer_idx "
                               f"(found {sorted(found)})")
        for layer in layers:
            self._check_built_for_us(layer, found[layer])
        first = expert_backend(found[layers[0]])
        num_experts = first.__dict__.get("num_experts")
        if not isinstance(num_experts, int):
            raise ValueError(f"{type(first).__name__} has no integer num_experts")
        self.config.check_num_experts(num_experts)
        comm, self._comm = self._comm, None
        self.manager = self._factory(self.config, num_experts, comm)
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
        self.steps = StepAdapter(self.manager, layers)
        logger.info("DWDP setup: %d layer(s) share %d experts through composite views",
                    len(layers), num_experts)
        return self

    def _check_built_for_us(self, layer: int, module: nn.Module) -> None:
        """The layer must have been built while this manager was active: upstream's MoE reads
        the manager's layout at construction and loads exactly experts [start, start + W)."""
        for target in (module, expert_backend(module)):
            start = target.__dict__.get("slot_start")
            size = target.__dict__.get("expert_size_per_partition")
            if isinstance(start, int) and isinstance(size, int) and \
                    (start, size) != (self.start_expert_id, self.num_experts_per_worker):
                raise RuntimeError(
                    f"DWDP setup: layer {layer} ({type(target).__name__}) holds experts "
                    f"[{start}, {start + size}) but DWDP rank {self.dwdp_rank} owns "
                    f"[{self.start_expert_id}, {self.end_expert_id}): the model was built "
                    "without this DWDP manager active. Build it with dwdp_config set and the "
                    "adapter active (TensorRT-LLM's MoE layers read the manager's layout while "
                    "they are constructed; a model built without DWDP cannot be converted)")

    def _share(self, layer: int, module: nn.Module) -> None:
        """Copy the layer's local expert tensors into shareable memory and point the backend's
        parameters at it (the original storage is freed with its last reference)."""
        backend = expert_backend(module)
        w = self.num_experts_per_worker
        tensors = {}
        for name, t in expert_tensors(backend).items():
            if t.shape[0] != w:
                raise ValueError(
                    f"layer {layer}: {type(backend).__name__}.{name} holds {t.shape[0]} experts, "
                    f"dwdp_config.num_experts_per_worker is {w}; the MoE must load only this "
                    "rank's slice")
            shared = self.manager.allocate(tuple(t.shape), t.dtype)
            shared.copy_(t)
            bind_tensor(backend, name, shared)
            tensors[name] = shared
        rebind_quant_scales(backend)
        self.manager.register_layer(layer, tensors)
        self._backends[layer] = backend

    # ------------------------------------------------------------------ per step / layer
    def _ready(self, what: str) -> StepAdapter:
        if self.steps is None:
            raise RuntimeError(f"DwdpManager.{what}: setup() has not been called yet")
        return self.steps

    def prefetch_first_layers(self) -> None:
        self._ready("prefetch_first_layers").start_step()

    def wait_and_bind(self, backend_module: nn.Module, layer_idx: int) -> None:
        """Bind layer ``layer_idx``'s ``[E, ...]`` composite tensors as the backend's weights."""
        views = self._ready("wait_and_bind").bind(layer_idx)
        backend = expert_backend(backend_module)
        for name, tensor in views.items():
            bind_tensor(backend, name, tensor)

    def record_compute_and_prefetch_next(self, layer_idx: int) -> None:
        self._ready("record_compute_and_prefetch_next").record(layer_idx)

    # ------------------------------------------------------------------ teardown
    def cleanup(self) -> None:
        """Close our manager (or the communicator when setup never ran); idempotent."""
        manager, self.manager = self.manager, None
        comm, self._comm = self._comm, None
        if self.steps is not None:
            logger.debug("DWDP steps: %s", self.steps.counts)
        self.steps = None
        self._backends.clear()
        if manager is not None:
            manager.close()
        if comm is not None:
            comm.close()

    def __enter__(self) -> "TrtllmDwdpBridge":
        _set_upstream_global(self)
        return self

    def __exit__(self, *exc: object) -> bool:
        try:
            self.cleanup()
        finally:
            _unset_upstream_global(self)
        return False


def _upstream_dwdp_module() -> Any:
    try:
        from tensorrt_llm._torch.pyexecutor import dwdp as upstream
    except ImportError as exc:
        raise ImportError(
            "using TrtllmDwdpBridge as TensorRT-LLM's DWDP manager needs tensorrt_llm "
            "(pip install tensorrt_llm, a release with _torch/pyexecutor/dwdp.py)"
        ) from exc
    return upstream


def _set_upstream_global(manager: Any) -> None:
    """Upstream's MoE layers find the manager through this global at construction time; like
    upstream's ``__enter__``, a second manager in one process is refused."""
    upstream = _upstream_dwdp_module()
    current = upstream.get_global_dwdp_manager()
    if current is not None and current is not manager:
        raise RuntimeError("a DwdpManager is already registered globally in this process")
    upstream.set_global_dwdp_manager(manager)


def _unset_upstream_global(manager: Any) -> None:
    upstream = _upstream_dwdp_module()
    if upstream.get_global_dwdp_manager() is manager:
        upstream.set_global_dwdp_manager(None)
