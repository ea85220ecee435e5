"""``ConfigurableMoE``: finds the manager at construction, claims its layer for DWDP
(``add_layer(layer_idx=...)``), and brackets every forward with ``wait_and_bind`` and
``record_compute_and_prefetch_next`` (the latter skipped when the compute raises)."""
from __future__ import annotations

import torch
from torch import nn

from tensorrt_llm._torch.moe.fused_moe.fused_moe_cute_dsl import CuteDslFusedMoE
from tensorrt_llm._torch.pyexecutor.dwdp import get_global_dwdp_manager

_SYNCED = ("ep_size", "ep_rank", "expert_size_per_partition", "slot_start", "slot_end",
           "num_slots", "initial_local_expert_ids", "initial_global_assignments")


class ConfigurableMoE(nn.Module):
    def __init__(self, *, top_k: int, **backend_kwargs) -> None:
        super().__init__()
        self.layer_idx = backend_kwargs["layer_idx"]
        self.top_k = top_k
        self.dwdp_manager = get_global_dwdp_manager()
        self.enable_dwdp = False
        self.backend = CuteDslFusedMoE(**backend_kwargs)
        for name in _SYNCED:
            setattr(self, name, getattr(self.backend, name))
        self._register_dwdp()
        self.backend.create_weights()

    def _should_enable_dwdp(self) -> bool:
        if not self.backend.capabilities.supports_dwdp or self.backend.uses_locality_domain:
            return False
        mode = getattr(self.backend.quant_config, "layer_quant_mode", None)
        return bool(mode is not None and mode.has_nvfp4())

    def _register_dwdp(self) -> None:
        if self.dwdp_manager is not None and self._should_enable_dwdp():
            self.enable_dwdp = True
            self.dwdp_manager.add_layer(layer_idx=self.layer_idx)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return self.forward_impl(x, router_logits)

    def forward_impl(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if self.enable_dwdp:
            self.dwdp_manager.wait_and_bind(self.backend, self.layer_idx)
        weights, ids = torch.softmax(router_logits, dim=-1).topk(self.top_k, dim=-1)
        outputs = self.backend.run(x, ids, weights)
        if self.enable_dwdp:
            self.dwdp_manager.record_compute_and_prefetch_next(self.layer_idx)
        return outputs
