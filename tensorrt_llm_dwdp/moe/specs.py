"""The expert tensor layout: names, per-expert shapes and dtypes of one MoE layer's experts.

The one definition the library (``ExpertWeights``, the checkpoint loader), the benchmarks,
the kernel tests and the multi-rank tests import; docs/ARCHITECTURE.md shows the same table.
Every tensor has the expert as dim 0, so an expert range is one contiguous byte range.

========================  ===========================  ==================  ===============================
name                      nvfp4                        bf16                fp8 (block 128)
========================  ===========================  ==================  ===============================
w3_w1_weight              uint8 [n, 2I, H/2]           bf16 [n, 2I, H]     float8_e4m3fn [n, 2I, H]
w3_w1_weight_scale        float8_e4m3fn [n, 2I, H/16]  -                   -
w3_w1_weight_scale_inv    -                            -                   float32 [n, 2I/128, H/128]
fc31_alpha                float32 [n]                  -                   -
w2_weight                 uint8 [n, H, I/2]            bf16 [n, H, I]      float8_e4m3fn [n, H, I]
w2_weight_scale           float8_e4m3fn [n, H, I/16]   -                   -
w2_weight_scale_inv       -                            -                   float32 [n, H/128, I/128]
fc2_alpha                 float32 [n]                  -                   -
w3_w1_bias (optional)     float32 [n, 2I]              float32 [n, 2I]     float32 [n, 2I]
w2_bias (optional)        float32 [n, H]               float32 [n, H]      float32 [n, H]
========================  ===========================  ==================  ===============================

Rows ``[0, I)`` of ``w3_w1`` are w3 (up_proj), rows ``[I, 2I)`` w1 (gate_proj). FP8 experts
(the DeepSeek-V3 / Qwen3 FP8 checkpoints' format, ``quant/fp8.py``) need H and I multiples of
128, so up's and gate's 128-row scale blocks concatenate like their rows. Pure arithmetic: no
device, no allocation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

NVFP4 = "nvfp4"
BF16 = "bf16"
FP8 = "fp8"
QUANT_MODES = (NVFP4, BF16, FP8)
NVFP4_BLOCK = 16  # elements per e4m3 block scale along K
FP8_BLOCK = 128  # rows and columns per fp32 weight_scale_inv block (quant.fp8.FP8_BLOCK)
BIAS_NAMES = ("w3_w1_bias", "w2_bias")
REQUIRED_NAMES = {
    NVFP4: ("w3_w1_weight", "w3_w1_weight_scale", "fc31_alpha",
            "w2_weight", "w2_weight_scale", "fc2_alpha"),
    BF16: ("w3_w1_weight", "w2_weight"),
    FP8: ("w3_w1_weight", "w3_w1_weight_scale_inv", "w2_weight", "w2_weight_scale_inv"),
}


@dataclass(frozen=True)
class TensorSpec:
    """One expert tensor: ``dtype`` and the shape of ONE expert (dim 0 dropped)."""

    name: str
    dtype: torch.dtype
    per_expert: tuple[int, ...]

    def shape(self, num_experts: int) -> tuple[int, ...]:
        return (num_experts, *self.per_expert)

    def nbytes(self, num_experts: int = 1) -> int:
        n = num_experts
        for d in self.per_expert:
            n *= d
        return n * self.dtype.itemsize


def check_sizes(quant: str, hidden: int, inter: int) -> None:
    """Raise ValueError unless ``quant`` is known and H, I fit it (NVFP4: multiples of 16; FP8:
    multiples of 128, whole scale blocks)."""
    if quant not in QUANT_MODES:
        raise ValueError(f"unknown expert quantization {quant!r}; choose one of {QUANT_MODES}")
    if hidden < 1 or inter < 1:
        raise ValueError(f"expert sizes H={hidden}, I={inter} must be >= 1")
    if quant == NVFP4 and (hidden % NVFP4_BLOCK or inter % NVFP4_BLOCK):
        raise ValueError(f"NVFP4 experts need H={hidden} and I={inter} to be multiples of "
                         f"{NVFP4_BLOCK}")
    if quant == FP8 and (hidden % FP8_BLOCK or inter % FP8_BLOCK):
        raise ValueError(f"FP8 experts need H={hidden} and I={inter} to be multiples of "
                         f"{FP8_BLOCK} (whole 128x128 scale blocks; the tiny-*-fp8 presets fit)")


def expert_specs(quant: str, hidden: int, inter: int, *, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
    """``{name: TensorSpec}`` of every tensor of ``quant`` experts of hidden size H and
    intermediate size I (biases when ``bias``); ``dtype`` is the bf16 mode's weight dtype."""
    check_sizes(quant, hidden, inter)
    h, i = hidden, inter
    if quant == NVFP4:
        rows = [("w3_w1_weight", torch.uint8, (2 * i, h // 2)),
                ("w3_w1_weight_scale", torch.float8_e4m3fn, (2 * i, h // NVFP4_BLOCK)),
                ("fc31_alpha", torch.float32, ()),
                ("w2_weight", torch.uint8, (h, i // 2)),
                ("w2_weight_scale", torch.float8_e4m3fn, (h, i // NVFP4_BLOCK)),
                ("fc2_alpha", torch.float32, ())]
    elif quant == FP8:
        rows = [("w3_w1_weight", torch.float8_e4m3fn, (2 * i, h)),
                ("w3_w1_weight_scale_inv", torch.float32, (2 * i // FP8_BLOCK, h // FP8_BLOCK)),
                ("w2_weight", torch.float8_e4m3fn, (h, i)),
                ("w2_weight_scale_inv", torch.float32, (h // FP8_BLOCK, i // FP8_BLOCK))]
    else:
        rows = [("w3_w1_weight", dtype, (2 * i, h)), ("w2_weight", dtype, (h, i))]
    if bias:
        rows += [("w3_w1_bias", torch.float32, (2 * i,)), ("w2_bias", torch.float32, (h,))]
    return {name: TensorSpec(name, dt, shape) for name, dt, shape in rows}


def expert_shapes(quant: str, num_experts: int, hidden: int, inter: int, *, bias: bool = False,
                  dtype: torch.dtype = torch.bfloat16) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{name: (shape, dtype)}`` of ``num_experts`` experts (what an allocator takes)."""
    return {n: (s.shape(num_experts), s.dtype)
            for n, s in expert_specs(quant, hidden, inter, bias=bias, dtype=dtype).items()}


def expert_nbytes(quant: str, hidden: int, inter: int, *, bias: bool = False,
                  dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of ONE expert over all its tensors (NVFP4: weights, block scales and alphas; FP8:
    weights and fp32 block scales)."""
    return sum(s.nbytes() for s in expert_specs(quant, hidden, inter, bias=bias, dtype=dtype).values())


def allocate_experts(quant: str, num_experts: int, hidden: int, inter: int,
                     alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor], *,
                     bias: bool = False, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """``{name: alloc(shape, dtype)}`` for ``num_experts`` experts."""
    return {n: alloc(shape, dt) for n, (shape, dt) in
            expert_shapes(quant, num_experts, hidden, inter, bias=bias, dtype=dtype).items()}
