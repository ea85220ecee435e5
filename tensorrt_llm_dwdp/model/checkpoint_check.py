"""Check a checkpoint's tensors against what a load will read, from the shard headers only.

``load_model`` runs this after building the model on the meta device and before allocating
it or reading any weight, so a missing tensor, a wrong shape or dtype, an FP8 weight without
its ``weight_scale_inv``, or a scale grid of another block size fails naming the tensor before
anything reaches a GPU. The reads that follow check again as they go (nothing here is trusted
to be exhaustive for every format); this pass makes the common mistakes fail first and cheap.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from tensorrt_llm_dwdp.model.hf_names import (
    BF16, FP8, FP8_SCALE_SUFFIX, NVFP4, PROJS, expert_key,
)
from tensorrt_llm_dwdp.model.safetensors_io import CheckpointReader
from tensorrt_llm_dwdp.quant.fp8 import FP8_BLOCK, weight_scale_shape

DENSE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_NVFP4_WEIGHT = "uint8 .weight with weight_scale / weight_scale_2 (NVFP4)"


def _dtype_hint(key: str, got: torch.dtype, want: str) -> str:
    msg = f"{key}: dtype {got} in the checkpoint, expected {want}"
    if got == torch.float8_e4m3fn and "float8" not in want:
        msg += (" (an FP8 weight: does config.json declare quantization_config {quant_method: "
                "fp8, weight_block_size: [128, 128]}, without this module in "
                "modules_to_not_convert?)")
    return msg


def _check_scale(reader: CheckpointReader, weight_key: str, n: int, k: int) -> None:
    key = weight_key[: -len("weight")] + FP8_SCALE_SUFFIX
    if key not in reader:
        raise ValueError(f"{key}: missing; the FP8 weight {weight_key} [{n}, {k}] needs its "
                         f"float32 block scales [{-(-n // FP8_BLOCK)}, {-(-k // FP8_BLOCK)}]")
    entry = reader.entries[key]
    want = weight_scale_shape(n, k)
    if entry.shape != want:
        raise ValueError(f"{key}: shape {entry.shape} != {want}, one scale per "
                         f"{FP8_BLOCK}x{FP8_BLOCK} block of {weight_key} [{n}, {k}] (a checkpoint "
                         "of another block size is not supported)")
    if entry.dtype != torch.float32:
        raise ValueError(_dtype_hint(key, entry.dtype, "float32"))


def check_dense(reader: CheckpointReader, params: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                tie_word_embeddings: bool = False) -> None:
    """``params``: ``{checkpoint key: (shape, dtype)}`` of every non-expert tensor the model
    holds (its meta state dict under HF names). FP8 weights must come as e4m3 with their
    scales; float ones as any float (cast at load) or an NVFP4 triple (dequantized at load)."""
    for key, (shape, dtype) in params.items():
        if key.endswith("." + FP8_SCALE_SUFFIX):
            continue  # checked with its weight
        if key not in reader:
            if key == "lm_head.weight" and tie_word_embeddings:
                continue
            raise KeyError(f"checkpoint {reader.path} lacks tensor {key!r}")
        entry = reader.entries[key]
        if dtype == torch.float8_e4m3fn:
            if entry.dtype != torch.float8_e4m3fn:
                raise ValueError(f"{key}: dtype {entry.dtype} in the checkpoint, expected "
                                 "float8_e4m3fn (an FP8 checkpoint's linear weight)")
            if entry.shape != shape:
                raise ValueError(f"{key}: shape {entry.shape} != expected {shape}")
            _check_scale(reader, key, *shape)
            continue
        if entry.dtype == torch.uint8 and key.endswith(".weight"):
            continue  # NVFP4, checked as it is dequantized
        if entry.dtype not in DENSE_DTYPES:
            raise ValueError(_dtype_hint(key, entry.dtype, " or ".join(map(str, DENSE_DTYPES))
                                         + " (or an " + _NVFP4_WEIGHT + ")"))
        if entry.shape != shape:
            raise ValueError(f"{key}: shape {entry.shape} != expected {shape}")


def check_experts(reader: CheckpointReader, layers: Iterable[int], experts: range, quant: str,
                  hidden: int, inter: int) -> None:
    """Every routed-expert tensor of ``layers`` x ``experts`` a ``quant`` load reads is there
    with its shape and dtype (NVFP4's global scales are checked as they are read)."""
    for layer in layers:
        for e in experts:
            for proj in PROJS:
                n, k = (hidden, inter) if proj == "down_proj" else (inter, hidden)
                key = expert_key(layer, e, proj)
                if key not in reader:
                    raise KeyError(f"checkpoint {reader.path} lacks tensor {key!r}")
                entry = reader.entries[key]
                if quant == FP8:
                    want, shape = torch.float8_e4m3fn, (n, k)
                elif quant == NVFP4:
                    want, shape = torch.uint8, (n, k // 2)
                else:
                    want, shape = None, (n, k)
                if want is not None and entry.dtype != want:
                    raise ValueError(_dtype_hint(key, entry.dtype, str(want).replace("torch.", "")))
                if quant == BF16 and entry.dtype not in DENSE_DTYPES:
                    raise ValueError(_dtype_hint(key, entry.dtype, "a float dtype (bf16 experts)"))
                if entry.shape != shape:
                    raise ValueError(f"{key}: shape {entry.shape} != expected {shape}")
                if quant == FP8:
                    _check_scale(reader, key, n, k)
