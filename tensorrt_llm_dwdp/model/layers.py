"""Building blocks shared by both decoders, numerically matching the HF reference modules.

RMSNorm normalises in float32 and casts back before the weight multiply; rotary angles are
computed in float32 and cast to the activation dtype before the rotation (as HF does).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tensorrt_llm_dwdp.model.config import RopeConfig
from tensorrt_llm_dwdp.model.fp8_linear import linear_siblings


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's rms_norm on the fp32 copy: the same math as HF's (bitwise on the CPU), one
        # fused kernel on the GPU instead of five elementwise passes over the activations
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)


class Embedding(nn.Module):
    """Token embedding whose table is left uninitialised: it always comes from a checkpoint.

    (``nn.Embedding`` draws a normal init, which on the meta device pulls in torch._dynamo:
    seconds per process for nothing.)
    """

    def __init__(self, num: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class MLP(nn.Module):
    """SwiGLU MLP: ``down(silu(gate(x)) * up(x))`` (dense layers and shared experts)."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear_siblings(x, self.gate_proj, self.up_proj)  # FP8: x quantized once
        return self.down_proj(F.silu(gate) * up)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature factor ``0.1 * mscale * ln(scale) + 1`` (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[dim/2]`` (float32) and the cos/sin scale for ``rope``.

    YaRN blends interpolated (``/factor``) and original frequencies with a linear ramp over the
    dims whose wavelength lies between ``beta_fast`` and ``beta_slow`` rotations of the original
    context (bounds floored/ceiled), and scales cos/sin by ``mscale(factor, mscale) /
    mscale(factor, mscale_all_dim)`` (1 for DeepSeek-V3).
    """
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    if rope.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    if rope.mscale and rope.mscale_all_dim:
        scaling = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    else:
        scaling = yarn_mscale(rope.factor)

    def correction_dim(rotations: float) -> float:
        ctx = rope.original_max_position_embeddings
        return dim * math.log(ctx / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv = (1.0 / (rope.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv, float(scaling)


class Rotary(nn.Module):
    """cos/sin ``[N, dim]`` for absolute positions, and the rotation of ``[N, heads, dim]``."""

    def __init__(self, rope: RopeConfig, dim: int) -> None:
        super().__init__()
        # A plain attribute, not a buffer: models are built on the meta device and
        # materialised with to_empty(), which would leave a buffer uninitialised.
        self.inv_freq, self.scaling = rope_inv_freq(rope, dim)
        self.interleave = rope.interleave
        self._on_device: dict[torch.device, torch.Tensor] = {}  # one copy per device, kept

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._on_device.get(positions.device)
        if inv_freq is None:  # copied once: a copy per step would stop a CUDA graph capture
            inv_freq = self._on_device[positions.device] = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [N, heads, dim]``. Interleaved (DeepSeek) pairs ``(x[2i], x[2i+1])`` and
        writes the result de-interleaved, ``[evens | odds]``, as HF does for both q and k."""
        cos, sin = cos[:, None, :], sin[:, None, :]
        if self.interleave:
            half = x.shape[-1] // 2
            c, s = cos[..., :half], sin[..., :half]
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin
