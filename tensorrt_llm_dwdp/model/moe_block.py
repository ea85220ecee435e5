"""A model's MoE layer: routed experts (``ConfigurableMoE``) plus optional shared experts."""
from __future__ import annotations

import torch
from torch import nn


class MoeBlock(nn.Module):
    """``experts(x) + shared_experts(x)``; ``experts`` routes and runs the routed experts."""

    def __init__(self, experts: nn.Module, shared_experts: nn.Module | None) -> None:
        super().__init__()
        self.experts = experts
        self.shared_experts = shared_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.experts(x)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y
