"""Our ``DwdpManager`` behind the interface TensorRT-LLM's PyTorch backend calls.

TensorRT-LLM (``tensorrt_llm/_torch/pyexecutor/dwdp.py`` and its callers, see docs/TRTLLM.md)
drives a DWDP manager through these calls, which this bridge maps onto ours:

==========================================  =============================================
upstream call (who makes it)                 ours
==========================================  =============================================
``add_layer(layer_idx)`` (ConfigurableMoE)   a collector for that layer
``collector.register_weights(backend)``      ``register_layer(i, expert tensors)``
(``CuteDslFusedMoE.load_weights``)
``exchange_all_handles()`` (executor)        ``exchange()``
``initialize_prefetch_buffer()`` (executor)  nothing: ``exchange`` allocated the buffers
``prefetch_first_layers()`` (PyExecutor,     ``start_step()``
each forward step)
``build_weight_view(i, backend)``            ``weights(i)`` as an ``NvFp4WeightView``
(MoE scheduler, before the kernel)
``record_compute_and_prefetch_next(i)``      ``done(i)``
(``ConfigurableMoE.forward_impl``)
``cleanup()`` / ``__exit__``                 ``close()``
==========================================  =============================================

Our manager needs the model's expert count, which upstream only reveals when the first layer
registers its weights (``backend.num_experts``), so it is created then.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout
from tensorrt_llm_dwdp.trtllm.names import expert_backend, expert_tensors, quant_scale_tensors
from tensorrt_llm_dwdp.trtllm.view import weight_view_fields

logger = logging.getLogger(__name__)

ManagerFactory = Callable[[DwdpConfig, int], Any]


class LayerCollector:
    """Upstream's per-layer handle collector: registers one layer's tensors with our manager."""

    def __init__(self, bridge: "TrtllmDwdpBridge", layer_idx: int) -> None:
        self.bridge = bridge
        self.layer_idx = layer_idx
        self.registered = False

    def register_weights(self, module: nn.Module) -> None:
        self.bridge.register_module(self.layer_idx, module)
        self.registered = True


class TrtllmDwdpBridge:
    """Presents our manager as TensorRT-LLM's ``DwdpManager``.

    ``manager_factory(config, num_experts)`` builds our manager (default: ``DwdpManager`` over
    an MPI group with ``device``); tests pass one over other transports.
    """

    def __init__(self, config: DwdpConfig, *, rank: int,
                 manager_factory: ManagerFactory, num_experts: int | None = None) -> None:
        if not config.enabled:
            raise ValueError("TrtllmDwdpBridge needs dwdp_size > 1 (DWDP on)")
        if not 0 <= rank < config.dwdp_size:
            raise ValueError(f"dwdp rank {rank} outside [0, {config.dwdp_size})")
        self.config = config
        self.dwdp_size = config.dwdp_size
        self.dwdp_rank = rank
        self.num_experts_per_worker = config.num_experts_per_worker
        self.num_prefetch_experts = config.num_prefetch_experts
        self._factory = manager_factory
        self._num_experts = num_experts
        self.manager: Any = None
        self.layout: ExpertLayout | None = None
        self.collectors: dict[int, LayerCollector] = {}
        self._local: dict[int, nn.Module] = {}
        self._exchanged = False

    # ------------------------------------------------------------------ registration
    def is_enabled(self) -> bool:
        return self.dwdp_size > 1

    def add_layer(self, layer_idx: int) -> LayerCollector:
        if layer_idx in self.collectors:
            raise ValueError(f"MoE layer {layer_idx} was added to DWDP twice")
        collector = LayerCollector(self, layer_idx)
        self.collectors[layer_idx] = collector
        return collector

    def _ensure_manager(self, module: nn.Module) -> None:
        if self.manager is not None:
            return
        num_experts = self._num_experts
        if num_experts is None:
            num_experts = module.__dict__.get("num_experts")
            if not isinstance(num_experts, int):
                raise ValueError(
                    f"{type(module).__name__} has no integer num_experts; pass num_experts= "
                    "to TrtllmDwdpBridge"
                )
        self.config.check_num_experts(num_experts)
        self._num_experts = num_experts
        self.layout = ExpertLayout.from_config(self.config, num_experts, self.dwdp_rank)
        self.manager = self._factory(self.config, num_experts)

    def register_module(self, layer_idx: int, module: nn.Module) -> None:
        """Register ``module``'s expert tensors (TensorRT-LLM names) as layer ``layer_idx``."""
        if self._exchanged:
            raise RuntimeError(f"layer {layer_idx} registered after the handle exchange")
        owner = expert_backend(module)
        self._ensure_manager(owner)
        tensors = expert_tensors(owner)
        w = self.num_experts_per_worker
        if tensors["w3_w1_weight"].shape[0] != w:
            raise ValueError(
                f"layer {layer_idx}: {type(owner).__name__}.w3_w1_weight holds "
                f"{tensors['w3_w1_weight'].shape[0]} experts, dwdp_config.num_experts_per_worker "
                f"is {w}; the MoE must allocate only this rank's slice"
            )
        self.manager.register_layer(layer_idx, tensors)
        self._local[layer_idx] = owner

    # ------------------------------------------------------------------ start-up
    def exchange_all_handles(self) -> None:
        if self.manager is None:
            raise RuntimeError("no MoE layer registered its weights before the DWDP exchange")
        unregistered = sorted(i for i, c in self.collectors.items() if not c.registered)
        if unregistered:
            raise RuntimeError(f"MoE layers {unregistered} were added but never loaded weights")
        self.manager.exchange()
        self._exchanged = True

    def initialize_prefetch_buffer(self) -> None:
        if not self._exchanged:
            raise RuntimeError("initialize_prefetch_buffer called before exchange_all_handles")

    # ------------------------------------------------------------------ per step / layer
    def prefetch_first_layers(self) -> None:
        self.manager.start_step()

    def wait_prefetch_and_get_buffer(self, layer_idx: int) -> dict[str, list[torch.Tensor]]:
        return {k: list(v) for k, v in self.manager.weights(layer_idx).items()}

    def build_weight_view(self, layer_idx: int, backend: nn.Module) -> Any:
        """TensorRT-LLM's ``NvFp4WeightView`` of layer ``layer_idx`` (waits for its prefetch)."""
        try:
            from tensorrt_llm._torch.modules.fused_moe.fused_moe_cute_dsl import NvFp4WeightView
        except ImportError as exc:
            raise ImportError("build_weight_view needs TensorRT-LLM (pip install tensorrt_llm)") from exc
        view = self.manager.weights(layer_idx)
        local = dict(expert_tensors(backend))
        local.update(quant_scale_tensors(backend))
        fields = weight_view_fields(view, local, self.dwdp_rank)
        return NvFp4WeightView(
            **fields,
            expert_size_per_partition=self._num_experts,
            slot_start=0,
        )

    def record_compute_and_prefetch_next(self, layer_idx: int) -> None:
        self.manager.done(layer_idx)

    # ------------------------------------------------------------------ teardown
    def cleanup(self) -> None:
        if self.manager is not None:
            self.manager.close()
            self.manager = None
        self._local.clear()

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
