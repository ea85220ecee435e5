"""Torch reference MoE backend (CPU and GPU, NVFP4 and bf16 weights): the numerics every
fused kernel matches within bf16 tolerance.

Per expert ``e`` that received tokens (rows of the :class:`PermutationPlan`, in (token, slot)
order), with ``a = x[rows]`` (bf16 -> fp32, exact):

1. ``W13 = dequant(w3_w1_weight[e])``: NVFP4 decodes ``e2m1 * e4m3`` exactly (the bf16 tile a
   W4A16 kernel feeds its MMA; no global scale); bf16 weights are used as they are.
2. ``g = (a @ W13^T)`` in fp32, ``* fc31_alpha[e]`` (NVFP4 only), ``+ w3_w1_bias[e]`` (if any,
   fp32). ``up = g[:, :I]`` (w3), ``gate = g[:, I:]`` (w1).
3. ``h = bf16(silu(gate) * up)``, computed in fp32 and rounded once to bf16 (the
   intermediate a two-kernel FC1/FC2 pipeline stores).
4. ``y = (fp32(h) @ W2^T)`` in fp32, ``* fc2_alpha[e]`` (NVFP4), ``+ w2_bias[e]`` (if any),
   ``* topk_weight`` of the (token, slot) (fp32).
5. Each token sums its k slot outputs in fp32 in slot order ``j = 0..k-1`` (fixed order, so
   the result is deterministic), then rounds once to bf16.

The fp32 GEMMs accumulate in whatever order torch picks on the device, so kernels match
this within bf16 tolerance, not bit for bit; on one device the result is deterministic and does
not depend on how the experts are split across view tensors. Experts are looped over
(vectorised per expert); tokens never are. Preshuffled NVFP4 weights (``ExpertWeights.
weight_layout``) are unshuffled exactly per expert first, so the result is bitwise the linear
set's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tensorrt_llm_dwdp.moe.layouts import LINEAR, PRESHUFFLED
from tensorrt_llm_dwdp.moe.permute import build_permutation
from tensorrt_llm_dwdp.moe.weights import ExpertWeights
from tensorrt_llm_dwdp.quant.nvfp4 import dequantize_nvfp4


def check_run_experts_args(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: ExpertWeights
) -> None:
    """The ``run_experts`` contract, checked up front with messages naming the argument."""
    if x.dim() != 2 or x.dtype != torch.bfloat16:
        raise ValueError(f"run_experts: x must be bf16 [T, H], got {x.dtype} {tuple(x.shape)}")
    if x.shape[1] != weights.hidden_size:
        raise ValueError(
            f"run_experts: x hidden size {x.shape[1]} != weights hidden size {weights.hidden_size}"
        )
    if topk_ids.dim() != 2 or topk_ids.dtype != torch.int32 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"run_experts: topk_ids must be int32 [T={x.shape[0]}, k], got {topk_ids.dtype} "
            f"{tuple(topk_ids.shape)}"
        )
    if topk_weights.dtype != torch.float32 or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"run_experts: topk_weights must be float32 {tuple(topk_ids.shape)}, got "
            f"{topk_weights.dtype} {tuple(topk_weights.shape)}"
        )
    w_device = weights.tensors["w3_w1_weight"][0].device
    for name, t in (("x", x), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if t.device != w_device:
            raise ValueError(f"run_experts: {name} on {t.device}, weights on {w_device}")


def dequantized_expert(
    weights: ExpertWeights, expert: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """fp32 ``W13 [2I, H]``, ``W2 [H, I]`` of one expert (NVFP4: exact ``e2m1 * e4m3``, global
    scale NOT applied; any weight layout) and the expert's other tensors (alphas, biases)."""
    p = weights.linear_expert(expert)
    if weights.quant == "nvfp4":
        w13 = dequantize_nvfp4(p["w3_w1_weight"], p["w3_w1_weight_scale"], None, torch.float32)
        w2 = dequantize_nvfp4(p["w2_weight"], p["w2_weight_scale"], None, torch.float32)
    else:
        w13, w2 = p["w3_w1_weight"].float(), p["w2_weight"].float()
    return w13, w2, p


def expert_mlp(a: torch.Tensor, weights: ExpertWeights, expert: int) -> torch.Tensor:
    """Steps 1-4 (without the router weight) for rows ``a [n, H]`` fp32 -> ``[n, H]`` fp32."""
    w13, w2, p = dequantized_expert(weights, expert)
    g = a @ w13.t()
    if weights.quant == "nvfp4":
        g = g * p["fc31_alpha"]
    if "w3_w1_bias" in p:
        g = g + p["w3_w1_bias"]
    inter = weights.intermediate_size
    h = (F.silu(g[:, inter:]) * g[:, :inter]).to(torch.bfloat16)
    y = h.float() @ w2.t()
    if weights.quant == "nvfp4":
        y = y * p["fc2_alpha"]
    if "w2_bias" in p:
        y = y + p["w2_bias"]
    return y


class TorchMoeBackend:
    """Reference ``run_experts``; see the module docstring for the exact numerics."""

    accepts_multi_tensor = True
    weight_layouts = (LINEAR, PRESHUFFLED)  # BACKEND_LAYOUTS; preshuffled: unshuffled exactly

    def run_experts(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        weights: ExpertWeights,
    ) -> torch.Tensor:
        check_run_experts_args(x, topk_ids, topk_weights, weights)
        tokens, k = topk_ids.shape
        # tile_m=1: the reference needs no padding, only the grouped (token, slot) order. The
        # reference is host-driven (it loops over the experts that got tokens, which it reads
        # back), so it checks the ids at once too.
        plan = build_permutation(topk_ids, weights.num_experts, tile_m=1, sync_check=True)
        slot_out = torch.zeros(tokens * k, x.shape[1], dtype=torch.float32, device=x.device)
        flat_weights = topk_weights.reshape(-1)
        offsets = plan.expert_offsets.tolist()
        for e in torch.nonzero(plan.counts).flatten().tolist():
            rows = slice(offsets[e], offsets[e + 1])
            slots = plan.slot_index[rows].long()
            a = x[plan.gather_index[rows].long()].float()
            y = expert_mlp(a, weights, e)
            slot_out[slots] = y * flat_weights[slots, None]
        per_slot = slot_out.view(tokens, k, x.shape[1])
        out = per_slot[:, 0].clone()
        for j in range(1, k):
            out = out + per_slot[:, j]
        return out.to(torch.bfloat16)


def create_backend() -> TorchMoeBackend:
    return TorchMoeBackend()
