"""HF per-expert tensors -> this project's fused expert storage (docs/ARCHITECTURE.md).

bf16: ``w3_w1_weight[e] = cat(up, gate)`` ``[2I, H]``, ``w2_weight[e] = down`` ``[H, I]``.
NVFP4: the packed bytes and e4m3 block scales are concatenated the same way and
``fc31_alpha[e]`` / ``fc2_alpha[e]`` take ModelOpt's ``weight_scale_2``. up and gate must share
one global scale: when their ``weight_scale_2`` differ, the half with the smaller one has its
block scales multiplied by ``g_small / g_large``, which is exact (bit-identical decoded values)
when every rescaled block scale is representable in e4m3; otherwise that half is re-quantized
onto the larger global scale (lossy, logged as a warning).
FP8 (block 128): the e4m3 weights are concatenated the same way and so are their float32
``weight_scale_inv`` blocks (I is a multiple of 128, so up's and gate's blocks never share a row
block): ``w3_w1_weight_scale_inv[e] = cat(up, gate)`` ``[2I/128, H/128]``,
``w2_weight_scale_inv[e] = down``'s ``[H/128, I/128]``. Bytes are copied, nothing is rescaled.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from tensorrt_llm_dwdp.model.hf_names import BF16, FP8, FP8_SCALE_SUFFIX, expert_key
from tensorrt_llm_dwdp.model.safetensors_io import CheckpointReader
from tensorrt_llm_dwdp.moe.specs import allocate_experts
from tensorrt_llm_dwdp.quant.fp8 import FP8_BLOCK, weight_scale_shape
from tensorrt_llm_dwdp.quant.nvfp4 import dequantize_nvfp4, quantize_nvfp4

logger = logging.getLogger(__name__)

Allocator = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def share_global_scale(
    up: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    gate: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    where: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(packed, scale, global)`` of up and gate -> ``(up_packed, up_scale, gate_packed,
    gate_scale, global)`` on one global scale (the larger of the two)."""
    g_up, g_gate = up[2].float().reshape(()), gate[2].float().reshape(())
    if torch.equal(g_up, g_gate):
        return up[0], up[1], gate[0], gate[1], g_up
    g = torch.maximum(g_up, g_gate)
    halves = []
    for name, (packed, scale, g_h) in (("up_proj", up), ("gate_proj", gate)):
        g_h = g_h.float().reshape(())
        if torch.equal(g_h, g):
            halves.append((packed, scale))
            continue
        rescaled = (scale.float() * (g_h / g)).to(torch.float8_e4m3fn)
        exact = torch.equal(rescaled.double() * g.double(), scale.double() * g_h.double())
        if exact:
            halves.append((packed, rescaled))
        else:
            logger.warning(
                "%s %s: weight_scale_2 %.6g differs from the shared %.6g and the block scales "
                "do not rescale exactly in e4m3; re-quantizing this half (lossy)",
                where, name, g_h.item(), g.item(),
            )
            w = dequantize_nvfp4(packed, scale, g_h)
            q = quantize_nvfp4(w, g)
            halves.append((q.packed, q.scale))
    return halves[0][0], halves[0][1], halves[1][0], halves[1][1], g


def _read(reader: CheckpointReader, key: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    t = reader.get(key)
    if tuple(t.shape) != shape:
        raise ValueError(f"{key}: shape {tuple(t.shape)} != expected {shape}")
    if t.dtype not in dtypes:
        raise ValueError(f"{key}: dtype {t.dtype} not in expected {[str(d) for d in dtypes]}")
    return t


_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _read_nvfp4(reader: CheckpointReader, layer: int, e: int, proj: str, rows: int, k: int):
    packed = _read(reader, expert_key(layer, e, proj, "weight"), (rows, k // 2), (torch.uint8,))
    scale = _read(reader, expert_key(layer, e, proj, "weight_scale"), (rows, k // 16), (torch.float8_e4m3fn,))
    g = reader.get(expert_key(layer, e, proj, "weight_scale_2"))
    if g.numel() != 1:
        raise ValueError(f"{expert_key(layer, e, proj, 'weight_scale_2')}: expected a scalar, got shape {tuple(g.shape)}")
    g = g.float().reshape(())
    if not (torch.isfinite(g) and g > 0):
        raise ValueError(f"{expert_key(layer, e, proj, 'weight_scale_2')}: must be finite and > 0, got {g.item()}")
    return packed, scale, g


def _read_fp8(reader: CheckpointReader, layer: int, e: int, proj: str, rows: int, k: int):
    q = _read(reader, expert_key(layer, e, proj), (rows, k), (torch.float8_e4m3fn,))
    s = _read(reader, expert_key(layer, e, proj, FP8_SCALE_SUFFIX), weight_scale_shape(rows, k),
              (torch.float32,))
    return q, s


def load_layer_experts(
    reader: CheckpointReader,
    layer: int,
    experts: range,
    quant: str,
    hidden: int,
    inter: int,
    alloc: Allocator,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """Read ONLY ``experts`` of MoE layer ``layer`` and return them in our storage, in tensors
    made by ``alloc(shape, dtype)`` (so DWDP can place them in peer-mappable memory)."""
    out = allocate_experts(quant, len(experts), hidden, inter, alloc, dtype=dtype)
    for j, e in enumerate(experts):
        if quant == BF16:
            gate = _read(reader, expert_key(layer, e, "gate_proj"), (inter, hidden), _FLOATS)
            up = _read(reader, expert_key(layer, e, "up_proj"), (inter, hidden), _FLOATS)
            down = _read(reader, expert_key(layer, e, "down_proj"), (hidden, inter), _FLOATS)
            out["w3_w1_weight"][j, :inter].copy_(up)
            out["w3_w1_weight"][j, inter:].copy_(gate)
            out["w2_weight"][j].copy_(down)
            continue
        if quant == FP8:
            gate = _read_fp8(reader, layer, e, "gate_proj", inter, hidden)
            up = _read_fp8(reader, layer, e, "up_proj", inter, hidden)
            down = _read_fp8(reader, layer, e, "down_proj", hidden, inter)
            half = inter // FP8_BLOCK
            out["w3_w1_weight"][j, :inter].copy_(up[0])
            out["w3_w1_weight"][j, inter:].copy_(gate[0])
            out["w3_w1_weight_scale_inv"][j, :half].copy_(up[1])
            out["w3_w1_weight_scale_inv"][j, half:].copy_(gate[1])
            out["w2_weight"][j].copy_(down[0])
            out["w2_weight_scale_inv"][j].copy_(down[1])
            continue
        gate = _read_nvfp4(reader, layer, e, "gate_proj", inter, hidden)
        up = _read_nvfp4(reader, layer, e, "up_proj", inter, hidden)
        down = _read_nvfp4(reader, layer, e, "down_proj", hidden, inter)
        up_p, up_s, gate_p, gate_s, g13 = share_global_scale(up, gate, f"layer {layer} expert {e}")
        out["w3_w1_weight"][j, :inter].copy_(up_p)
        out["w3_w1_weight"][j, inter:].copy_(gate_p)
        out["w3_w1_weight_scale"][j, :inter].copy_(up_s)
        out["w3_w1_weight_scale"][j, inter:].copy_(gate_s)
        out["fc31_alpha"][j] = g13
        out["w2_weight"][j].copy_(down[0])
        out["w2_weight_scale"][j].copy_(down[1])
        out["fc2_alpha"][j] = down[2]
    return out
