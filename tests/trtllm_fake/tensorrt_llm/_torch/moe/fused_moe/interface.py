"""``MoE``: the backend base class; ``_init_dwdp_expert_layout`` reads the active manager's
layout (``num_experts_per_worker``, ``dwdp_size``, ``start_expert_id``) while the layer is
built, before ``ConfigurableMoE`` calls ``add_layer``."""
from __future__ import annotations

import torch
from torch import nn


class MoE(nn.Module):
    def __init__(self, *, num_experts: int, hidden_size: int, intermediate_size: int,
                 layer_idx: int, mapping, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_experts, self.layer_idx, self.mapping = num_experts, layer_idx, mapping
        self.hidden_size, self.intermediate_size, self.dtype = hidden_size, intermediate_size, dtype
        self.ep_size, self.ep_rank = mapping.moe_ep_size, mapping.moe_ep_rank
        self.layer_load_balancer = None
        self.expert_size_per_partition = num_experts // self.ep_size
        self.num_slots = num_experts
        self.slot_start = self.ep_rank * self.expert_size_per_partition
        self.slot_end = self.slot_start + self.expert_size_per_partition
        self.initial_global_assignments = list(range(num_experts))
        self.initial_local_expert_ids = list(range(self.slot_start, self.slot_end))
        self._init_dwdp_expert_layout()

    def _init_dwdp_expert_layout(self) -> None:
        from tensorrt_llm._torch.pyexecutor.dwdp import get_global_dwdp_manager

        dwdp_manager = get_global_dwdp_manager()
        if dwdp_manager is None:
            return
        assert self.layer_load_balancer is None, "DWDP and EPLB cannot be used together"
        self.num_slots = self.num_experts
        self.expert_size_per_partition = dwdp_manager.num_experts_per_worker
        dwdp_size = dwdp_manager.dwdp_size
        self.initial_global_assignments = [
            (ep_rank * self.num_experts // dwdp_size + local_slot_id) % self.num_experts
            for ep_rank in range(dwdp_size)
            for local_slot_id in range(self.expert_size_per_partition)
        ]
        self.slot_start = dwdp_manager.start_expert_id
        self.slot_end = self.slot_start + self.expert_size_per_partition
        self.initial_local_expert_ids = list(range(self.slot_start, self.slot_end))
