"""FP8 activation quantization per token per 128 channels on Hopper: argument checks, outputs,
launch geometry, cached compilation and launch of ``fp8_quant_kernel.Fp8ActQuant``.

``quantize_act_per_token_cuda`` gives bit for bit what ``quant.fp8.quantize_act_per_token``
gives for the same bf16 input on a CUDA device (values and scales; the kernel module's
docstring says how), in one pass, with no host sync and no allocation beyond the outputs (pass
``out`` / ``scale_out`` to allocate nothing: CUDA-graph capturable). Unlike the reference it
does not check for inf / NaN (that check syncs the host); they propagate into the scales.
"""
from __future__ import annotations

import torch

from ..compile_cache import CompileCache, require_cutlass
from .grouped_launch import current_stream, sm_count

GROUP = 128  # channels per scale (quant.fp8.FP8_BLOCK)
LANES_PER_ITEM = 8  # a quarter warp per (token, group)
THREADS = 256
SLOTS_PER_CTA = THREADS // LANES_PER_ITEM  # quarter warps per CTA
ITEMS_PER_STEP = 2 * SLOTS_PER_CTA  # each quarter warp takes two items per step
CTAS_PER_SM = 8  # a wave's CTAs per SM at full occupancy (at 40 registers, 6 are resident)
MIN_WAVES = 4  # fold steps into one CTA only while the grid stays this many waves deep
MAX_ITERS = 4
SCALE_LAYOUTS = ("row", "col")
_INT32_MAX = 2**31 - 1


def launch_geometry(items: int, sms: int) -> tuple[int, int]:
    """``(iters, ctas)`` for ``items`` (token, group) pairs on ``sms`` SMs: each CTA runs
    ``iters`` steps of 64 items. One step per CTA until the grid would exceed ``MIN_WAVES``
    full waves, then up to ``MAX_ITERS`` (fewer, longer CTAs for large T)."""
    if items <= 0 or sms <= 0:
        raise ValueError(f"launch_geometry: need items > 0 and sms > 0, got {items}, {sms}")
    steps = -(-items // ITEMS_PER_STEP)
    iters = max(1, min(MAX_ITERS, steps // (MIN_WAVES * sms * CTAS_PER_SM)))
    return iters, -(-steps // iters)


def check_input(x: torch.Tensor) -> None:
    """Raise (TypeError / ValueError naming the problem) unless the kernel takes ``x``:
    a CUDA bf16 ``[T, K]`` with K a positive multiple of 128, unit column stride, 16-byte
    aligned rows."""
    what = "quantize_act_per_token_cuda"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.bfloat16:
        raise TypeError(f"{what}: x must be bfloat16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{what}: x must be [T, K], got shape {tuple(x.shape)}")
    t, k = x.shape
    if k <= 0 or k % GROUP:
        raise ValueError(
            f"{what}: K = {k} must be a positive multiple of {GROUP} (one scale per {GROUP} "
            f"channels); quant.fp8.quantize_act_per_token handles a partial last group"
        )
    if not x.is_cuda:
        raise ValueError(f"{what}: x must be on a CUDA device, got {x.device}")
    if t == 0:
        return
    if x.stride(1) != 1 or (t > 1 and (x.stride(0) < k or x.stride(0) % 8)):
        raise ValueError(
            f"{what}: x rows must be contiguous and start 16 bytes apart (column stride 1, row "
            f"stride a multiple of 8 elements >= K), got strides {x.stride()} for shape "
            f"{tuple(x.shape)}"
        )
    if x.data_ptr() % 16:
        raise ValueError(f"{what}: x must be 16-byte aligned, got address {x.data_ptr():#x}")
    if t * (k // GROUP) > _INT32_MAX - MAX_ITERS * ITEMS_PER_STEP or x.stride(0) > _INT32_MAX:
        raise ValueError(f"{what}: x of shape {tuple(x.shape)} / strides {x.stride()} exceeds "
                         f"the kernel's 32-bit item and row-stride range")


def _check_output(what: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, int],
                  strides: tuple[int, int], device: torch.device, align: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"quantize_act_per_token_cuda: {what} must be {dtype}, got {got}")
    if tuple(t.shape) != shape or t.device != device:
        raise ValueError(f"quantize_act_per_token_cuda: {what} must be {shape} on {device}, got "
                         f"{tuple(t.shape)} on {t.device}")
    if any(n > 1 and st != want for n, st, want in zip(shape, t.stride(), strides)):
        raise ValueError(f"quantize_act_per_token_cuda: {what} strides {t.stride()} != "
                         f"{strides} (the layout the kernel writes)")
    if t.data_ptr() % align:
        raise ValueError(f"quantize_act_per_token_cuda: {what} must be {align}-byte aligned")


def scale_strides(tokens: int, groups: int, scale_layout: str) -> tuple[int, int]:
    """Strides of the scale ``[tokens, groups]``: row-major for ``"row"``, group-major
    (``scale.t().contiguous().t()``) for ``"col"``."""
    if scale_layout not in SCALE_LAYOUTS:
        raise ValueError(f"scale_layout must be one of {SCALE_LAYOUTS}, got {scale_layout!r}")
    return (groups, 1) if scale_layout == "row" else (1, tokens)


def quantize_act_per_token_cuda(
    cache: CompileCache,
    x: torch.Tensor,
    *,
    scale_layout: str = "row",
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` bf16 ``[T, K]`` (CUDA, K a multiple of 128) per token per 128 channels.

    Returns ``(q float8_e4m3fn [T, K] contiguous, scale float32 [T, K/128])``, the scale
    row-major (``scale_layout="row"``) or group-major (``"col"``, strides ``(1, T)``), equal
    bit for bit to ``quant.fp8.quantize_act_per_token(x)`` run on the device. ``out`` /
    ``scale_out``: preallocated outputs of exactly that shape, dtype and layout (checked).
    ``cache`` holds the compiled kernel (one per scale layout). Launches on the current stream
    of ``x``'s device; nothing syncs.
    """
    check_input(x)
    tokens, k = x.shape
    groups = k // GROUP
    strides = scale_strides(tokens, groups, scale_layout)
    if out is None:
        out = torch.empty(tokens, k, dtype=torch.float8_e4m3fn, device=x.device)
    else:
        _check_output("out", out, torch.float8_e4m3fn, (tokens, k), (k, 1), x.device, 16)
    if scale_out is None:
        scale_out = (torch.empty(tokens, groups, dtype=torch.float32, device=x.device)
                     if scale_layout == "row" else
                     torch.empty(groups, tokens, dtype=torch.float32, device=x.device).t())
    else:
        _check_output("scale_out", scale_out, torch.float32, (tokens, groups), strides,
                      x.device, 4)
    if tokens == 0:
        return out, scale_out
    require_cutlass()
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr

    iters, ctas = launch_geometry(tokens * groups, sm_count(x.device))
    gmem = cute.AddressSpace.gmem
    with torch.cuda.device(x.device):  # the stream and context of x's device
        args = [
            make_ptr(cutlass.BFloat16, x.data_ptr(), gmem, assumed_align=16),
            make_ptr(cutlass.Uint8, out.data_ptr(), gmem, assumed_align=16),
            make_ptr(cutlass.Float32, scale_out.data_ptr(), gmem, assumed_align=4),
            *[cutlass.Int32(v) for v in (tokens, groups, x.stride(0), iters, ctas)],
            current_stream(),
        ]

        def build():
            from .fp8_quant_kernel import Fp8ActQuant

            return cute.compile(Fp8ActQuant(scale_layout), *args)

        cache.get(("fp8_act_quant", scale_layout), build)(*args)
    return out, scale_out
