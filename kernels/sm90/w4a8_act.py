"""The W4A8 kernels' activation operand: the one place activations are quantized for them.

``w4a8_activations(x)`` = ``quant.fp8_device.quantize_act_per_token_fast`` (the math of
``quant.w4a8.quantize_activations``: e4m3 per token per 128 channels, fp32 scales; the fused
sm90 kernel, bit for bit ``quant.fp8.quantize_act_per_token``, with no host sync, so the layer
can be captured in a CUDA graph; the torch recipe where the kernel does not apply) with the
values permuted inside every 16-wide group of K into the order the kernel's fp8 A fragments put
the weight codes (``preshuffle.permute_act_k16``).
"""
from __future__ import annotations

import torch

from tensorrt_llm_dwdp.quant.fp8_device import quantize_act_per_token_fast

from .preshuffle import permute_act_k16


def w4a8_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [T, K]`` bf16 (K a multiple of 128) -> (e4m3 ``[T, K]`` in the kernel's K order,
    fp32 scales ``[T, K / 128]``), both contiguous."""
    if x.dim() != 2 or x.shape[1] % 128:
        raise ValueError(f"W4A8 activations: expected [T, K] with K a multiple of 128, got "
                         f"{tuple(x.shape)}")
    xq, xs = quantize_act_per_token_fast(x)
    permuted = permute_act_k16(xq.view(torch.uint8)).view(torch.float8_e4m3fn)
    return permuted, xs.contiguous()
