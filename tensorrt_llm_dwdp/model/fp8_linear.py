"""FP8 block-128 dense linears: the projections of an FP8 checkpoint (MLA q_a/q_b/kv_a/kv_b/o,
Qwen3 q/k/v/o, dense MLPs, shared experts) kept in e4m3 with their ``weight_scale_inv``.

``Fp8Linear`` holds ``weight`` float8_e4m3fn ``[N, K]`` and ``weight_scale_inv`` float32
``[ceil(N/128), ceil(K/128)]`` under the checkpoint's names, so the loader fills it by name. Its
forward quantizes activations per token per 128 channels and runs the block-scaled GEMM
(``quant/fp8.py`` states the numerics), bf16 out:

- ``scaled_mm`` (CUDA sm90, K a multiple of 128, N of 16): torch's vendor GEMM
  (``torch.nn.functional.scaled_mm``, ScalingType BlockWise1x128 activations x BlockWise128x128
  weights; cuBLASLt >= 12.9 on Hopper; torch builds without ``F.scaled_mm`` take the same
  recipe through ``torch._scaled_mm``, which infers it from the scales' shapes and strides),
  with the activations quantized by the fused kernel of ``quant/fp8_device.py`` (one pass,
  bitwise the reference recipe, the scales written in the layout the GEMM reads; small inputs
  by the torch recipe, whose launches cost less host time: ``quantize_rows``);
- ``reference`` (CPU; sm90 shapes the vendor GEMM does not take): ``quant.fp8.fp8_linear_ref``;
- ``dequantized`` (GPUs without FP8 tensor cores, e.g. sm80): W8A16, the weight dequantized
  once to bf16 (``dequantized_weight``, kept beside the e4m3 one: 3 bytes per weight instead of
  1) and ``F.linear`` on unquantized activations; numerics of transformers' FP8 path on such
  devices, not the FP8 reference's.

The vendor GEMM accumulates in its own order, so the two agree within the tolerance stated by
``tests/gpu/test_fp8_linear_gpu.py``, not bitwise; each is deterministic on one device.
``convert_linears_`` turns a freshly built (meta) model's ``nn.Linear`` modules into
``Fp8Linear`` where the checkpoint quantizes them (every linear but ``lm_head`` and
``modules_to_not_convert``; the router is not an ``nn.Linear``).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tensorrt_llm_dwdp.quant.fp8 import (
    FP8_BLOCK, FP8_DTYPE, dequantize_weight_blocks, fp8_linear_ref, quantize_act_per_token,
    weight_scale_shape,
)
from tensorrt_llm_dwdp.quant.fp8_device import kernel_applies, quantize_act_per_token_fast

SCALED_MM = "scaled_mm"
REFERENCE = "reference"
DEQUANTIZED = "dequantized"
GEMM_BACKENDS = ("auto", SCALED_MM, REFERENCE, DEQUANTIZED)
UNQUANTIZED = ("lm_head",)


def _has_v2_api() -> bool:
    return hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")


def scaled_mm_available(device: torch.device) -> bool:
    """True when torch offers the DeepSeek-style blockwise scaled GEMM on ``device`` (an sm90
    GPU; torch checks cuBLASLt >= 12.9 itself and raises naming it)."""
    if device.type != "cuda" or not (_has_v2_api() or hasattr(torch, "_scaled_mm")):
        return False
    return torch.cuda.get_device_capability(device)[0] == 9


def fits_scaled_mm(n: int, k: int) -> bool:
    """Shapes the vendor GEMM takes here: whole 128-wide K blocks, 16-byte aligned output rows."""
    return k % FP8_BLOCK == 0 and n % 16 == 0


def scaled_mm_weight_scales(ws: torch.Tensor) -> torch.Tensor:
    """``weight_scale_inv [ceil(N/128), Kb]`` -> the layout torch's blockwise GEMM reads for
    BlockWise128x128 ``mat_b = W^T``. ``F.scaled_mm``: shape ``[round_up(Kb, 4), ceil(N/128)]``,
    strides ``(1, round_up(Kb, 4))`` (the zero-padded K blocks are never read: K is whole
    blocks); ``torch._scaled_mm``: ``ws^T``, strides ``(1, Kb)``."""
    if not _has_v2_api():
        return ws.contiguous().t()
    kb = ws.shape[1]
    kb4 = -(-kb // 4) * 4
    return F.pad(ws, (0, kb4 - kb)).contiguous().t()


@dataclass(frozen=True)
class QuantizedRows:
    """Activations ready for the vendor GEMM: ``q`` float8_e4m3fn ``[M_pad, K]`` and ``scale``
    float32 ``[M_pad, K/128]`` outer-dim-major (strides ``(1, M_pad)``), ``rows`` of them real.
    cuBLASLt finds no blockwise algorithm for a scale whose leading dimension M is not aligned
    (M = 1, 3, 17 fail with CUBLAS_STATUS_NOT_SUPPORTED on H100), so M is padded to a multiple
    of ``M_ALIGN`` with zero codes and unit scales; those output rows are dropped."""

    q: torch.Tensor
    scale: torch.Tensor
    rows: int


M_ALIGN = 16
# Inputs of at most this many elements are quantized by the torch recipe (about ten small
# kernels, ~70 us of host time): the fused kernel's launch costs ~0.3 ms of host time (first
# H100 measurement: kv_b at 2K tokens 0.28 ms for quantization against 0.09 ms for its GEMM),
# more than the recipe's GPU time up to here. Both give the same bits.
SMALL_INPUT = 1 << 22


def uses_fused_quant(x: torch.Tensor) -> bool:
    """Whether :func:`quantize_rows` quantizes ``x`` with the fused kernel."""
    return x.numel() > SMALL_INPUT and kernel_applies(x.contiguous())


def quantize_rows(x: torch.Tensor) -> QuantizedRows:
    """``x [M, K]`` bf16 (K a multiple of 128) quantized once, per token per 128 channels, into
    the padded layout the GEMM reads: the one place every FP8 GEMM input is quantized (the
    fused kernel of ``quant/fp8_device.py`` for large inputs on sm90, the torch recipe for
    small ones and elsewhere; the same bits)."""
    x = x.contiguous()
    m, k = x.shape
    m_pad = -(-m // M_ALIGN) * M_ALIGN
    if x.numel() <= SMALL_INPUT:
        q, scale = quantize_act_per_token(x)
        if m_pad != m:
            q = F.pad(q.view(torch.uint8), (0, 0, 0, m_pad - m)).view(FP8_DTYPE)
            scale = F.pad(scale, (0, 0, 0, m_pad - m), value=1.0)
        return QuantizedRows(q, scale.t().contiguous().t(), m)
    if m_pad == m:
        q, scale = quantize_act_per_token_fast(x, scale_layout="col")
        return QuantizedRows(q, scale, m)
    q = torch.empty(m_pad, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(m_pad, k // FP8_BLOCK, dtype=torch.float32, device=x.device)
    quantize_act_per_token_fast(x, scale_layout="row", out=q[:m], scale_out=scale[:m])
    q[m:].view(torch.uint8).zero_()
    scale[m:].fill_(1.0)
    return QuantizedRows(q, scale.t().contiguous().t(), m)


def scaled_mm_rows(xq: QuantizedRows, wq: torch.Tensor, ws_mm: torch.Tensor) -> torch.Tensor:
    """The vendor block-scaled GEMM of quantized rows and one FP8 weight -> bf16 ``[rows, N]``;
    ``ws_mm`` from :func:`scaled_mm_weight_scales`."""
    if not _has_v2_api():
        out = torch._scaled_mm(xq.q, wq.t(), xq.scale, ws_mm, out_dtype=torch.bfloat16)
    else:
        out = F.scaled_mm(xq.q, wq.t(), xq.scale, F.ScalingType.BlockWise1x128, ws_mm,
                          F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)
    return out if out.shape[0] == xq.rows else out[:xq.rows]


def fp8_linear_scaled_mm(x: torch.Tensor, wq: torch.Tensor, ws_mm: torch.Tensor) -> torch.Tensor:
    """``x [T, K]`` bf16 through the vendor block-scaled GEMM -> bf16 ``[T, N]``."""
    return scaled_mm_rows(quantize_rows(x), wq, ws_mm)


class Fp8Linear(nn.Module):
    """``y = x W^T (+ b)`` with ``W`` in FP8 block 128 (module docstring). ``gemm``: ``auto``
    (the vendor GEMM where it runs, ``dequantized`` on other GPUs, the reference on CPUs),
    ``scaled_mm``, ``reference`` or ``dequantized``; a plain attribute, settable after load."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16, gemm: str = "auto") -> None:
        super().__init__()
        if gemm not in GEMM_BACKENDS:
            raise ValueError(f"Fp8Linear: gemm {gemm!r} is not one of {GEMM_BACKENDS}")
        self.in_features, self.out_features, self.gemm = in_features, out_features, gemm
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE),
                                   requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(weight_scale_shape(out_features, in_features), dtype=torch.float32),
            requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._derived: dict[str, tuple[tuple, torch.Tensor]] = {}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fp8 block {FP8_BLOCK}, gemm={self.gemm}")

    def _cached(self, name: str, make) -> torch.Tensor:
        """A tensor derived from the weights, rebuilt when they change (load, ``to``)."""
        key = tuple((t.data_ptr(), t._version, t.device) for t in (self.weight, self.weight_scale_inv))
        hit = self._derived.get(name)
        if hit is None or hit[0] != key:
            hit = (key, make())
            self._derived[name] = hit
        return hit[1]

    def dequantized_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """``weight * weight_scale_inv`` per block in ``dtype``, computed once after the
        weights are loaded (MLA decode absorbs ``kv_b_proj`` into the query and output with
        it: a batched matmul per head, which has no block-scaled vendor kernel)."""
        return self._cached(f"dequant-{dtype}", lambda: dequantize_weight_blocks(
            self.weight, self.weight_scale_inv).to(dtype))

    def gemm_backend(self, device: torch.device) -> str:
        """The GEMM this module runs on ``device`` (``scaled_mm``, ``reference`` or
        ``dequantized``)."""
        if self.gemm != "auto":
            return self.gemm
        if scaled_mm_available(device):
            return SCALED_MM if fits_scaled_mm(self.out_features, self.in_features) else REFERENCE
        return DEQUANTIZED if device.type == "cuda" else REFERENCE

    def forward_rows(self, xq: QuantizedRows, lead: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """The vendor GEMM on activations quantized by :func:`quantize_rows` (shared between
        projections of one input: :func:`linear_siblings`) -> bf16 ``[*lead, N]``."""
        ws_mm = self._cached("scaled_mm-scales",
                             lambda: scaled_mm_weight_scales(self.weight_scale_inv))
        y = scaled_mm_rows(xq, self.weight, ws_mm)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if flat.shape[0] == 0:
            y = flat.new_zeros(0, self.out_features)
        elif (backend := self.gemm_backend(x.device)) == SCALED_MM:
            return self.forward_rows(quantize_rows(flat), lead)
        elif backend == DEQUANTIZED:
            y = F.linear(flat, self.dequantized_weight(torch.bfloat16))
        else:
            y = fp8_linear_ref(flat, self.weight, self.weight_scale_inv)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


def linear_siblings(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """``tuple(m(x) for m in linears)`` for projections of one input (MLA's q_a and kv_a,
    Qwen3's q, k, v, an MLP's gate and up). When all are ``Fp8Linear`` on the vendor GEMM, x is
    quantized once for all of them (the same bits each would compute alone): one pass over the
    activations instead of one per projection."""
    fp8 = all(isinstance(m, Fp8Linear) and m.gemm_backend(x.device) == SCALED_MM
              for m in linears)
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    if not fp8 or len(linears) < 2 or flat.shape[0] == 0:
        return tuple(m(x) for m in linears)
    xq = quantize_rows(flat.to(torch.bfloat16))
    return tuple(m.forward_rows(xq, lead) for m in linears)


def dense_weight(linear: nn.Module, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The weight ``[N, K]`` of ``linear`` as a plain float tensor (an ``nn.Linear``'s own; an
    ``Fp8Linear``'s dequantized once)."""
    if isinstance(linear, Fp8Linear):
        return linear.dequantized_weight(dtype)
    return linear.weight


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    """``modules_to_not_convert`` matching: a pattern names the module or one of its parents,
    exactly or as a glob (``model.layers.*.self_attn``)."""
    parts = name.split(".")
    scopes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(scope, p) for p in (*UNQUANTIZED, *patterns) for scope in scopes)


def convert_linears_(model: nn.Module, skip: tuple[str, ...] = (), gemm: str = "auto") -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (built, not loaded: on the meta device) except
    ``lm_head`` and ``skip`` by an ``Fp8Linear`` of the same shape; returns the names replaced."""
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or _skipped(name, skip):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        bias = module.bias is not None
        new = Fp8Linear(module.in_features, module.out_features, bias,
                        module.weight.dtype, gemm=gemm)
        setattr(parent, attr, new)
        replaced.append(name)
    return replaced

