"""Weight layouts: the byte order of NVFP4 expert weights in memory (``ExpertWeights.weight_layout``).

``linear``: the checkpoint's rows, as ``moe/specs.py`` describes them (what the torch backends
read natively).
``preshuffled``: the packed e2m1 weights and e4m3 block scales of ``w3_w1`` and ``w2`` permuted
once at load (``kernels/sm90/preshuffle.py``) into the order the sm90 RS kernel reads (the only
order it reads: one contiguous bulk copy per 64-row block and K tile, 4 shifts and 5 logic ops
per 4 A-fragment words); alphas and biases are unchanged. Shapes and
dtypes do not change and every expert's bytes stay inside that expert's byte range, so DWDP's
whole-expert copies (peer prefetch, host store, composite views) move shuffled experts as they
are. The bytes do not say which layout they are in: the loader that shuffles tags the weights,
the DWDP ranks of a group agree on the tag at the exchange, and every reader either runs the
preshuffled kernel (cutedsl) or unshuffles exactly (``to_linear``: torch, torch-grouped).
Checkpoints on disk stay linear. Each backend names the layouts it reads
(``weight_layouts``, native first); ``resolve_layout`` turns a request ("auto" or a layout)
into the one a model is loaded in, before anything is read.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from tensorrt_llm_dwdp.kernels.sm90 import preshuffle
from tensorrt_llm_dwdp.moe.specs import FP8, NVFP4

LINEAR = "linear"
PRESHUFFLED = preshuffle.LAYOUT
WEIGHT_LAYOUTS = (LINEAR, PRESHUFFLED)
# The tensors a layout permutes, and whether their rows are FC1's up / gate halves.
SHUFFLED = {"w3_w1_weight": True, "w3_w1_weight_scale": True,
            "w2_weight": False, "w2_weight_scale": False}
AUTO = "auto"
SHUFFLE_CHUNK = 16  # experts shuffled at once: the shuffle's temporaries are ~10x their bytes


def check_layout(weight_layout: str, quant: str, hidden: int | None = None,
                 inter: int | None = None) -> None:
    """Raise ValueError unless experts of ``quant`` with sizes H, I can be in ``weight_layout``
    (preshuffled: NVFP4, H and I multiples of the kernel's 64-row blocks and 64-wide K chunks;
    sizes None: not known yet, only the quant is checked)."""
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"unknown weight layout {weight_layout!r}; choose one of {WEIGHT_LAYOUTS}")
    if weight_layout == LINEAR:
        return
    if quant == FP8:
        raise ValueError(f"weight layout {weight_layout!r} permutes NVFP4 experts and the cutedsl "
                         "backend has no FP8 expert kernel yet: run FP8 experts with the torch "
                         "backend (the FP8 reference math) or torch-grouped (bf16 dequantized), "
                         "weight layout linear")
    if quant != NVFP4:
        raise ValueError(f"weight layout {weight_layout!r} permutes NVFP4 experts; these are "
                         f"{quant!r}: keep them linear, with a backend that reads that (torch, "
                         f"torch-grouped; cutedsl runs NVFP4 experts only)")
    block = preshuffle.BLOCK_ROWS
    if hidden is None or inter is None:
        return
    if hidden % block or inter % block:
        raise ValueError(f"weight layout {weight_layout!r} needs H={hidden} and I={inter} to be "
                         f"multiples of {block} (the sm90 kernel's blocks): keep them linear, with a "
                         f"torch backend")


def backend_layouts(backend) -> tuple[str, ...]:
    """The layouts backend object ``backend`` reads, its native one first (one without a
    ``weight_layouts`` attribute reads linear weights only)."""
    return tuple(getattr(backend, "weight_layouts", (LINEAR,)))


def resolve_layout(requested: str | None, reads: tuple[str, ...], backend_name: str) -> str:
    """The layout to keep experts in for a backend that reads ``reads`` (native first): the
    native one for ``requested`` None or "auto", else ``requested`` if the backend reads it
    (ValueError naming both if not)."""
    if requested in (None, AUTO):
        return reads[0]
    if requested not in WEIGHT_LAYOUTS:
        raise ValueError(f"unknown weight layout {requested!r}; choose one of "
                         f"{(AUTO, *WEIGHT_LAYOUTS)}")
    if requested not in reads:
        raise ValueError(f"MoE backend {backend_name!r} reads {' or '.join(reads)} expert weights, not "
                         f"{requested!r} (leave the weight layout on 'auto')")
    return requested


def _convert(name: str, t: torch.Tensor, inverse: bool) -> torch.Tensor:
    if name.endswith("_scale"):
        fn = preshuffle.unshuffle_scale if inverse else preshuffle.shuffle_scale
    else:
        fn = preshuffle.unshuffle_weight if inverse else preshuffle.shuffle_weight
    return fn(t, gated=SHUFFLED[name])


def _check_convertible(tensors: Mapping[str, torch.Tensor]) -> None:
    """ValueError unless every ``SHUFFLED`` tensor of ``tensors`` can be (un)shuffled (dtype,
    rank, rows and K on the kernel's grid): checked for all of them before an in-place
    conversion writes any, so a refused set is left as it was, not half converted."""
    for name, t in tensors.items():
        if name in SHUFFLED:
            scale = name.endswith("_scale")
            preshuffle._check(t, torch.float8_e4m3fn if scale else torch.uint8, name,
                              16 if scale else 2)


def _shuffle_chunks(name: str, src: torch.Tensor, dst: torch.Tensor, chunk: int,
                    inverse: bool = False) -> torch.Tensor:
    for e in range(0, src.shape[0], chunk):  # each chunk is read before it is overwritten
        dst[e:e + chunk] = _convert(name, src[e:e + chunk], inverse=inverse)
    return dst


def shuffle_experts_(tensors: Mapping[str, torch.Tensor],
                     chunk: int = SHUFFLE_CHUNK) -> Mapping[str, torch.Tensor]:
    """Permute the linear NVFP4 experts ``tensors`` (``{name: [n, ...]}``) into the preshuffled
    layout IN PLACE (the memory a loader allocated, e.g. for DWDP peers, stays the same), a
    few experts at a time; returns ``tensors``. Tensors other than ``SHUFFLED`` are left. A set
    off the kernel's grid is refused (ValueError) before any tensor is written."""
    _check_convertible(tensors)
    for name, t in tensors.items():
        if name in SHUFFLED:
            _shuffle_chunks(name, t, t, chunk)
    return tensors


def unshuffle_experts_(tensors: Mapping[str, torch.Tensor],
                       chunk: int = SHUFFLE_CHUNK) -> Mapping[str, torch.Tensor]:
    """The inverse of ``shuffle_experts_``: preshuffled experts back to linear, in place (a set
    off the grid is refused before any tensor is written)."""
    _check_convertible(tensors)
    for name, t in tensors.items():
        if name in SHUFFLED:
            _shuffle_chunks(name, t, t, chunk, inverse=True)
    return tensors


def shuffled_copy(name: str, t: torch.Tensor, chunk: int = SHUFFLE_CHUNK) -> torch.Tensor:
    """A preshuffled copy of tensor ``name`` (``[n, ...]`` linear experts); others as they are."""
    return _shuffle_chunks(name, t, torch.empty_like(t), chunk) if name in SHUFFLED else t


def to_linear(name: str, t: torch.Tensor, weight_layout: str) -> torch.Tensor:
    """Tensor ``name`` of one expert (``[rows, cols]``) or several (``[n, rows, cols]``) in
    ``weight_layout`` -> the same experts in the linear layout: ``t`` itself when nothing is
    permuted, else an exactly unshuffled copy."""
    if weight_layout == LINEAR or name not in SHUFFLED:
        return t
    if weight_layout != PRESHUFFLED:
        raise ValueError(f"unknown weight layout {weight_layout!r}; choose one of {WEIGHT_LAYOUTS}")
    return _convert(name, t, inverse=True)
