"""``CuteDslFusedMoE``: holds this rank's experts under upstream's attribute names and computes
with whatever ``[n, ...]`` tensors are bound (float32 stand-ins for the NVFP4 tensors, the
scales read through ``quant_scales`` as the NVFP4 kernels read them).

Per expert: ``w3_w1_weight`` [2I, H], ``w3_w1_weight_scale`` [2I, 1], ``w2_weight`` [H, I],
``w2_weight_scale`` [H, 1], ``fc31_alpha``, ``fc2_alpha`` and ``fc2_dequant`` (scalars; the last
is found only by upstream's name rule); ``fc31_input_scale`` [1] is global.
"""
from __future__ import annotations

from collections import namedtuple
from types import SimpleNamespace

import torch
from torch import nn

from tensorrt_llm._torch.moe.fused_moe.interface import MoE

FusedMoEQuantScalesNVFP4 = namedtuple(
    "FusedMoEQuantScalesNVFP4", "fc1_act_global fc1_weight_block fc1_global fc2_act_global "
    "fc2_weight_block fc2_global")


class _QuantMode:
    def has_nvfp4(self) -> bool:
        return True


class CuteDslFusedMoE(MoE):
    capabilities = SimpleNamespace(supports_dwdp=True)
    uses_locality_domain = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.quant_config = SimpleNamespace(layer_quant_mode=_QuantMode())

    def create_weights(self) -> None:
        n, h, i = self.expert_size_per_partition, self.hidden_size, self.intermediate_size
        shapes = {"w3_w1_weight": (n, 2 * i, h), "w3_w1_weight_scale": (n, 2 * i, 1),
                  "w2_weight": (n, h, i), "w2_weight_scale": (n, h, 1), "fc31_alpha": (n,),
                  "fc2_alpha": (n,), "fc2_dequant": (n,), "fc31_input_scale": (1,)}
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=self.dtype),
                                                       requires_grad=False))
        one = torch.ones((), dtype=self.dtype)
        self.quant_scales = FusedMoEQuantScalesNVFP4(
            one, self.w3_w1_weight_scale, self.fc31_alpha, one, self.w2_weight_scale,
            self.fc2_alpha)

    def load_weights(self, experts: dict) -> None:
        """``experts``: name -> tensor over ALL experts (the checkpoint); this rank keeps rows
        ``initial_local_expert_ids``, global ones whole."""
        rows = torch.tensor(self.initial_local_expert_ids)
        for name, value in experts.items():
            param = getattr(self, name)
            param.data.copy_(value if name == "fc31_input_scale" else value[rows])

    def run(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Routed expert MLP over global expert ids; raises for an expert this module lacks."""
        q = self.quant_scales
        out = torch.zeros_like(x)
        for e in sorted(set(topk_ids.flatten().tolist())):
            local = e - self.slot_start
            if not 0 <= local < self.expert_size_per_partition:
                raise IndexError(f"expert {e} is not held here (slots [{self.slot_start}, "
                                 f"{self.slot_end}))")
            tok, slot = (topk_ids == e).nonzero(as_tuple=True)
            w13 = self.w3_w1_weight[local] * q.fc1_weight_block[local]
            hidden = (x[tok] * self.fc31_input_scale) @ w13.T * q.fc1_global[local]
            gate, up = hidden.chunk(2, dim=-1)
            w2 = self.w2_weight[local] * q.fc2_weight_block[local]
            y = (torch.nn.functional.silu(gate) * up) @ w2.T
            y = y * q.fc2_global[local] * self.fc2_dequant[local]
            out.index_add_(0, tok, y * topk_weights[tok, slot, None])
        return out
