"""Torch reference MoE backend (CPU and GPU, NVFP4, bf16 and FP8 weights): the numerics every
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

FP8 experts (block 128, ``quant/fp8.py``) run the quantized math of the FP8 kernels instead of
steps 1-4: ``a`` is quantized per token per 128 channels (``quantize_act_per_token``), ``g =
blockwise_matmul_ref(a, w3_w1)`` (fp32 partials per 128 of K, promoted with the activation and
weight block scales), ``+ w3_w1_bias``; ``h = bf16(silu(gate) * up)`` with the SwiGLU in fp32 and
one rounding to bf16; ``h`` is quantized again per token per 128 (from its bf16 values) and
``y = blockwise_matmul_ref(h, w2)``, ``+ w2_bias``; steps 5 and the router weight as above.

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
from tensorrt_llm_dwdp.quant.fp8 import (blockwise_matmul_ref, dequantize_weight_blocks,
                                         quantize_act_per_token)
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
    scale NOT applied; FP8: ``e4m3 * weight_scale_inv`` per block, one fp32 rounding; any
    weight layout) and the expert's other tensors (alphas, biases)."""
    p = weights.linear_expert(expert)
    if weights.quant == "fp8":
        w13 = dequantize_weight_blocks(p["w3_w1_weight"], p["w3_w1_weight_scale_inv"])
        w2 = dequantize_weight_blocks(p["w2_weight"], p["w2_weight_scale_inv"])
    elif weights.quant == "nvfp4":
        w13 = dequantize_nvfp4(p["w3_w1_weight"], p["w3_w1_weight_scale"], None, torch.float32)
        w2 = dequantize_nvfp4(p["w2_weight"], p["w2_weight_scale"], None, torch.float32)
    else:
        w13, w2 = p["w3_w1_weight"].float(), p["w2_weight"].float()
    return w13, w2, p


def fp8_expert_mlp(a: torch.Tensor, p: dict[str, torch.Tensor], inter: int) -> torch.Tensor:
    """One FP8 expert ``p`` (``{name: tensor}``, dim 0 dropped) on rows ``a [n, H]`` (bf16
    values, any float dtype) -> ``[n, H]`` fp32: quantize, block-scaled FC1, fp32 SwiGLU, bf16
    h, requantize, block-scaled FC2 (module docstring). The reference the FP8 kernels match."""
    aq, as_ = quantize_act_per_token(a)
    g = blockwise_matmul_ref(aq, as_, p["w3_w1_weight"], p["w3_w1_weight_scale_inv"])
    if "w3_w1_bias" in p:
        g = g + p["w3_w1_bias"]
    h = (F.silu(g[:, inter:]) * g[:, :inter]).to(torch.bfloat16)
    hq, hs = quantize_act_per_token(h)
    y = blockwise_matmul_ref(hq, hs, p["w2_weight"], p["w2_weight_scale_inv"])
    if "w2_bias" in p:
        y = y + p["w2_bias"]
    return y


def expert_mlp(a: torch.Tensor, weights: ExpertWeights, expert: int) -> torch.Tensor:
    """Steps 1-4 (without the router weight) for rows ``a [n, H]`` fp32 -> ``[n, H]`` fp32."""
    if weights.quant == "fp8":
        return fp8_expert_mlp(a, weights.linear_expert(expert), weights.intermediate_size)
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
