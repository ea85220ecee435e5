"""A faster spelling of the torch reference MoE backend for the GPU benchmark.

Same numerics as ``moe/backends/torch_ref.py`` step for step (same permutation, same per-expert
math, same bf16 rounding of the intermediate, same fp32 slot sum in slot order); only two
things change:

- NVFP4 weights are decoded to bf16 (``e2m1 * e4m3`` is exact in bf16, so these are the very
  values the reference decodes to fp32), several experts at once: by one Triton kernel where
  Triton runs (``nvfp4_decode_triton``, one pass), else by a byte lookup table in PyTorch;
- the two GEMMs take bf16 operands with fp32 outputs on CUDA (``torch.mm(..., out_dtype=
  torch.float32)``: every product is exact in fp32, only the accumulation order may differ
  from the reference's fp32 GEMM). On the CPU (and on a PyTorch without that overload) the
  operands are widened to fp32 first, which makes the result bitwise the reference's
  (tests/bench checks that on the CPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench import nvfp4_decode_triton
from tensorrt_llm_dwdp.moe.backends.torch_ref import check_run_experts_args
from tensorrt_llm_dwdp.moe.permute import build_permutation
from tensorrt_llm_dwdp.moe.weights import ExpertWeights
from tensorrt_llm_dwdp.quant.nvfp4 import BLOCK_SIZE, E2M1_VALUES

DECODE_CHUNK = 16  # experts decoded per batch: bounds the bf16 scratch (16 x 58 MB for V3 w13)


def byte_table(device: torch.device) -> torch.Tensor:
    """``[256, 2]`` bf16: the two e2m1 values of every packed byte (low nibble first)."""
    values = torch.tensor(E2M1_VALUES, dtype=torch.bfloat16, device=device)
    byte = torch.arange(256, device=device)
    return torch.stack((values[byte & 0xF], values[byte >> 4]), dim=-1)


def decode_bf16(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``packed [..., K/2]`` uint8 with ``scale [..., K/16]`` e4m3 -> exact bf16 ``[..., K]``
    (no global scale): one table lookup per byte (int32 indices), one scale multiply."""
    k = packed.shape[-1] * 2
    pairs = F.embedding(packed.int(), byte_table(packed.device))          # [..., K/2, 2]
    vals = pairs.view(*packed.shape[:-1], k // BLOCK_SIZE, BLOCK_SIZE)
    return (vals * scale.to(torch.bfloat16).unsqueeze(-1)).view(*packed.shape[:-1], k)


def mm_fp32(a: torch.Tensor, b_t: torch.Tensor, fp32_out: bool) -> torch.Tensor:
    """fp32 ``a @ b_t.T`` of bf16 operands: cuBLAS bf16 GEMM with fp32 output when
    ``fp32_out``, else both widened to fp32 (the reference's own GEMM)."""
    if fp32_out:
        return torch.mm(a, b_t.t(), out_dtype=torch.float32)
    return a.float() @ b_t.float().t()


def has_fp32_out_mm(device: torch.device) -> bool:
    """Whether ``torch.mm(bf16, bf16, out_dtype=float32)`` runs on ``device`` (CUDA builds
    of recent PyTorch); otherwise the GEMMs run in fp32."""
    if device.type != "cuda":
        return False
    a = torch.ones(2, 16, dtype=torch.bfloat16, device=device)
    try:
        return torch.mm(a, a.t(), out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


class FastTorchMoeBackend:
    """``run_experts`` with the reference's numerics, decoded and multiplied in bf16."""

    def __init__(self) -> None:
        self._fp32_out: dict[torch.device, bool] = {}
        self._triton: dict[torch.device, bool] = {}

    def run_experts(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    weights: ExpertWeights) -> torch.Tensor:
        check_run_experts_args(x, topk_ids, topk_weights, weights)
        tokens, k = topk_ids.shape
        plan = build_permutation(topk_ids, weights.num_experts, tile_m=1)
        slot_out = torch.zeros(tokens * k, x.shape[1], dtype=torch.float32, device=x.device)
        flat_w = topk_weights.reshape(-1)
        offsets = plan.expert_offsets.tolist()
        active = torch.nonzero(plan.counts).flatten().tolist()
        inter = weights.intermediate_size
        if x.device not in self._fp32_out:
            self._fp32_out[x.device] = has_fp32_out_mm(x.device)
            self._triton[x.device] = nvfp4_decode_triton.available(x.device)
        fp32_out = self._fp32_out[x.device]
        decode = nvfp4_decode_triton.decode_bf16_triton if self._triton[x.device] else decode_bf16
        for start in range(0, len(active), DECODE_CHUNK):
            chunk = active[start:start + DECODE_CHUNK]
            w13s, w2s, extras = self._decode(weights, chunk, decode)
            for i, e in enumerate(chunk):
                rows = slice(offsets[e], offsets[e + 1])
                slots = plan.slot_index[rows].long()
                a = x[plan.gather_index[rows].long()]
                g = mm_fp32(a, w13s[i], fp32_out)
                p = extras[i]
                if "fc31_alpha" in p:
                    g = g * p["fc31_alpha"]
                if "w3_w1_bias" in p:
                    g = g + p["w3_w1_bias"]
                h = (F.silu(g[:, inter:]) * g[:, :inter]).to(torch.bfloat16)
                y = mm_fp32(h, w2s[i], fp32_out)
                if "fc2_alpha" in p:
                    y = y * p["fc2_alpha"]
                if "w2_bias" in p:
                    y = y + p["w2_bias"]
                slot_out[slots] = y * flat_w[slots, None]
        per_slot = slot_out.view(tokens, k, x.shape[1])
        out = per_slot[:, 0].clone()
        for j in range(1, k):
            out = out + per_slot[:, j]
        return out.to(torch.bfloat16)

    @staticmethod
    def _decode(weights: ExpertWeights, experts: list[int], decode):
        """bf16 W13/W2 of ``experts`` (decoded together with ``decode``) + each expert's other
        tensors (alphas, biases)."""
        params = [weights.expert(e) for e in experts]
        if weights.quant != "nvfp4":
            return ([p["w3_w1_weight"] for p in params], [p["w2_weight"] for p in params],
                    params)

        def gather(name: str) -> torch.Tensor:
            # Consecutive experts of one view tensor are one slice: no copy before decoding.
            (t0, l0), (t1, l1) = weights.locate(experts[0]), weights.locate(experts[-1])
            if t0 == t1 and l1 - l0 == len(experts) - 1 == experts[-1] - experts[0]:
                return weights.tensors[name][t0][l0:l1 + 1]
            return torch.stack([p[name] for p in params])

        w13 = decode(gather("w3_w1_weight"), gather("w3_w1_weight_scale"))
        w2 = decode(gather("w2_weight"), gather("w2_weight_scale"))
        return w13, w2, params


def create_backend() -> FastTorchMoeBackend:
    return FastTorchMoeBackend()
