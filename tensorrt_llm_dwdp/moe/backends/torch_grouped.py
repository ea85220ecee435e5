"""torch-grouped MoE backend: ``torch._grouped_mm`` over one ``[E, ...]`` tensor per parameter.

The vendor-kernel baseline of the benchmarks and a path for GPUs the CuTeDSL kernels do not
serve. It needs a single tensor per parameter (DWDP's composite view, or one rank holding all
experts): ``accepts_multi_tensor`` is False, so a multi-view DWDP layer refuses it at build time.

Per layer: rows are permuted by expert (``build_permutation``, tile 1; ``-1`` ids are empty
slots that add nothing, as an expert-parallel receiver passes them), then

1. ``g = grouped_mm(x_rows, W13^T)``: bf16 in, fp32 accumulation, bf16 out (torch's grouped GEMM
   returns its input dtype); ``g * fc31_alpha[e]`` (NVFP4) ``+ w3_w1_bias[e]`` in fp32;
2. ``h = bf16(silu(gate) * up)`` in fp32 (rows ``[0, I)`` are w3/up, ``[I, 2I)`` w1/gate);
3. ``y = grouped_mm(h, W2^T)`` (bf16 out), ``* fc2_alpha[e] + w2_bias[e]`` and the router weight
   in fp32; each token sums its k slots in slot order, rounded once to bf16.

With bf16 experts nothing in a layer reads the device: the plan's offsets go to
``torch._grouped_mm`` as a device tensor over the plan's row bound (``T k + 1``), so the layer
can be captured in a CUDA graph. NVFP4 experts are dequantized only for experts that got
tokens, which the host reads back (one sync per layer; not capturable). Out-of-range expert
ids are flagged on the device and raised by ``check_routing()`` (the engine's step end).

Against the torch reference the two GEMM outputs are rounded to bf16 once more, so results
agree within bf16 tolerance; the backend itself is deterministic and does not depend on where
the experts' bytes live, so a composite DWDP view and one rank holding all experts agree bit for
bit.

Weights: bf16 experts are read in place (``W^T`` is a transposed view, no copy). NVFP4 experts
have no kernel here (Hopper has no FP4 MMA and torch offers no NVFP4 grouped GEMM for it), so
the experts that received tokens are dequantized to exact bf16 (``e2m1 * e4m3`` is exact in bf16;
alpha stays an fp32 epilogue factor) ``chunk_experts`` at a time and multiplied per chunk. That
costs, per layer, reading 0.5625 and writing then reading 2 bytes per weight element of every
expert with tokens -- for DeepSeek-V3 with all 256 experts hit, 6.3 GB read and 2 x 22.5 GB of
bf16 traffic, about 10 ms at H200 bandwidth on top of the GEMMs -- plus a transient bf16 copy of
``chunk_experts`` experts (8: 0.7 GB). A correctness baseline for NVFP4, not a fast path.
FP8 (block 128) experts are dequantized the same way, ``chunk_experts`` at a time, to bf16
(``e4m3 * weight_scale_inv`` rounded once to bf16) and run with bf16 activations: a W8A16
baseline whose numerics are NOT the FP8 reference's (no activation quantization; the torch
backend and the FP8 kernels quantize activations per token per 128), so it agrees with them
within FP8 activation-quantization error, not bf16 tolerance. Per layer it reads 1 byte, then
writes and reads 2 bytes per weight element of every expert with tokens: for DeepSeek-V3 with
all 256 experts hit, 11.3 GB of e4m3 and 2 x 22.5 GB of bf16 traffic, about 12 ms at H200
bandwidth on top of the GEMMs. A correctness baseline for FP8 too, not a fast path
(``torch._scaled_grouped_mm`` takes row-wise scales, not 128x128 blocks). Preshuffled NVFP4 weights
(``ExpertWeights.weight_layout``) are unshuffled exactly per chunk before the dequantization,
so the result is bitwise the linear set's.

CPU: torch 2.13's CPU build runs ``_grouped_mm`` in bf16 (H and I multiples of 8: strides of
16 bytes), so the backend and its tests run there too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tensorrt_llm_dwdp.moe.backends.torch_ref import check_run_experts_args
from tensorrt_llm_dwdp.moe.layouts import LINEAR, PRESHUFFLED, to_linear
from tensorrt_llm_dwdp.moe.permute import RoutingErrors, build_permutation
from tensorrt_llm_dwdp.moe.weights import ExpertWeights
from tensorrt_llm_dwdp.quant.fp8 import dequantize_weight_blocks
from tensorrt_llm_dwdp.quant.nvfp4 import E2M1_VALUES

DEFAULT_CHUNK_EXPERTS = 8


def dequantize_bf16(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 ``packed [..., K/2]`` with e4m3 ``scale [..., K/16]`` to exact bf16 ``[..., K]``
    (no global scale); bf16 throughout, which is exact for e2m1 * e4m3.

    One ``index_select`` through a 256-entry table whose int32 entry is a byte's two bf16
    values (low nibble first), then the scale multiplied in place: per packed byte 4 bytes of
    int32 index, 4 of decoded pair, one read-modify-write of them (advanced indexing with an
    int64 index and a separate product moved about twice that; 1.7x slower on the CPU)."""
    values = torch.tensor(E2M1_VALUES, dtype=torch.bfloat16, device=packed.device)
    codes = torch.arange(256, device=packed.device)
    pairs = torch.stack((values[codes & 0xF], values[codes >> 4]), dim=-1)  # byte -> (lo, hi)
    k = packed.shape[-1] * 2
    decoded = pairs.view(torch.int32).view(256).index_select(0, packed.reshape(-1).int())
    out = decoded.view(torch.bfloat16).view(*packed.shape[:-1], k // 16, 16)
    return out.mul_(scale.to(torch.bfloat16).unsqueeze(-1)).view(*packed.shape[:-1], k)


def grouped_mm(a: torch.Tensor, b_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``a [M, K]`` rows grouped by ``offs`` (int32 group ends) times ``b_t [G, K, N]``."""
    if not hasattr(torch, "_grouped_mm"):
        raise RuntimeError("MoE backend 'torch-grouped' needs torch._grouped_mm (torch >= 2.8)")
    return torch._grouped_mm(a, b_t, offs=offs)


class TorchGroupedMoeBackend:
    """``run_experts`` with ``torch._grouped_mm`` (see the module docstring)."""

    accepts_multi_tensor = False
    weight_layouts = (LINEAR, PRESHUFFLED)  # BACKEND_LAYOUTS; preshuffled: unshuffled exactly

    def __init__(self, chunk_experts: int = DEFAULT_CHUNK_EXPERTS,
                 sync_check: bool = False) -> None:
        if chunk_experts < 1:
            raise ValueError(f"torch-grouped: chunk_experts must be >= 1, got {chunk_experts}")
        self.chunk_experts = chunk_experts
        self.routing_errors = RoutingErrors(sync_check)

    def _check(self, x: torch.Tensor, weights: ExpertWeights) -> None:
        if weights.num_tensors != 1:
            raise ValueError(
                f"torch-grouped backend: needs one [E, ...] tensor per parameter, got "
                f"{weights.num_tensors} (a multi-tensor DWDP view); use dwdp_config.expert_view: "
                "composite (run --expert-view composite)")
        h, inter = weights.hidden_size, weights.intermediate_size
        if h % 8 or inter % 8:
            raise ValueError(f"torch-grouped backend: H={h} and I={inter} must be multiples of 8 "
                             "(grouped GEMM strides are multiples of 16 bytes)")

    def graph_safe(self, quant: str) -> bool:
        """bf16 layers are capturable in a CUDA graph; NVFP4 ones read the counts back."""
        return quant == "bf16"

    def check_routing(self) -> None:
        """Raise ValueError naming an out-of-range expert id seen since the last call (one
        device read; the engine calls it at each step's end)."""
        self.routing_errors.check()

    def run_experts(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    weights: ExpertWeights) -> torch.Tensor:
        check_run_experts_args(x, topk_ids, topk_weights, weights)
        self._check(x, weights)
        tokens, k = topk_ids.shape
        hidden = x.shape[1]
        if tokens == 0:
            return torch.empty(0, hidden, dtype=torch.bfloat16, device=x.device)
        plan = build_permutation(topk_ids, weights.num_experts, tile_m=1)
        self.routing_errors.add(plan)
        # tile_m = 1: rows are the plan's bound (T k + 1); the real ones are a prefix, each
        # row's expert is its tile's; rows past the real ones read token 0 and are masked below.
        rows = x[plan.gather_index.clamp(min=0).long()]
        expert_of_row = plan.tile_expert.clamp(min=0).long()
        p = {name: ts[0] for name, ts in weights.tensors.items()}
        if weights.quant == "bf16":
            y = self._mlp(rows, p, weights, None, plan.expert_offsets[1:], expert_of_row)
        else:
            y = self._nvfp4_chunks(rows, p, weights, plan)
            y = y * p["fc2_alpha"][expert_of_row].unsqueeze(1)
        if "w2_bias" in p:
            y = y + p["w2_bias"][expert_of_row]
        valid = ((topk_ids >= 0) & (topk_ids < weights.num_experts)).unsqueeze(-1)
        per_slot = torch.where(valid, y[plan.inverse.long()] * topk_weights.unsqueeze(-1), 0.0)
        out = per_slot[:, 0].clone()
        for j in range(1, k):
            out = out + per_slot[:, j]
        return out.to(torch.bfloat16)

    def _nvfp4_chunks(self, rows: torch.Tensor, p: dict, weights: ExpertWeights,
                      plan) -> torch.Tensor:
        """fp32 FC2 rows (scale and bias not applied) of NVFP4 experts, ``chunk_experts`` of the
        experts that got tokens at a time. Picking them reads the counts back: this path syncs
        the host once per layer (it is the correctness baseline for NVFP4, not a fast path)."""
        offsets = plan.expert_offsets.tolist()
        counts = plan.counts
        active = torch.nonzero(counts).flatten().tolist()
        y = torch.zeros(rows.shape[0], weights.hidden_size, dtype=torch.float32,
                        device=rows.device)
        for i in range(0, len(active), self.chunk_experts):
            experts = active[i:i + self.chunk_experts]
            lo, hi = offsets[experts[0]], offsets[experts[-1] + 1]
            ids = torch.tensor(experts, device=rows.device)
            n = counts[ids].long()
            y[lo:hi] = self._mlp(rows[lo:hi], p, weights, ids, torch.cumsum(n, 0).to(torch.int32),
                                 torch.repeat_interleave(ids, n, output_size=hi - lo))
        return y

    def _mlp(self, a: torch.Tensor, p: dict, weights: ExpertWeights, ids: torch.Tensor | None,
             offs: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
        """FC1, SwiGLU, FC2 of rows ``a`` grouped by ``offs`` (int32 group ends, one group per
        expert of ``ids``, or of every expert for None) -> fp32 (FC2 scale and bias not applied
        yet); ``expert_of_row`` [rows] the global expert of each row. Rows past ``offs[-1]``
        come out undefined."""
        if weights.quant == "nvfp4":
            lin = {n: to_linear(n, p[n][ids], weights.weight_layout) for n in (
                "w3_w1_weight", "w3_w1_weight_scale", "w2_weight", "w2_weight_scale")}
            w13 = dequantize_bf16(lin["w3_w1_weight"], lin["w3_w1_weight_scale"])
            w2 = dequantize_bf16(lin["w2_weight"], lin["w2_weight_scale"])
        elif weights.quant == "fp8":
            w13 = dequantize_weight_blocks(p["w3_w1_weight"][ids],
                                           p["w3_w1_weight_scale_inv"][ids]).to(torch.bfloat16)
            w2 = dequantize_weight_blocks(p["w2_weight"][ids],
                                          p["w2_weight_scale_inv"][ids]).to(torch.bfloat16)
        else:
            w13 = p["w3_w1_weight"] if ids is None else p["w3_w1_weight"][ids]
            w2 = p["w2_weight"] if ids is None else p["w2_weight"][ids]
        g = grouped_mm(a, w13.transpose(1, 2), offs).float()
        if weights.quant == "nvfp4":
            g = g * p["fc31_alpha"][expert_of_row].unsqueeze(1)
        if "w3_w1_bias" in p:
            g = g + p["w3_w1_bias"][expert_of_row]
        inter = weights.intermediate_size
        h = (F.silu(g[:, inter:]) * g[:, :inter]).to(torch.bfloat16)
        return grouped_mm(h, w2.transpose(1, 2), offs).float()


def create_backend() -> TorchGroupedMoeBackend:
    return TorchGroupedMoeBackend()
