"""Load an HF-layout safetensors checkpoint (bf16, ModelOpt-NVFP4 experts, or FP8 block 128 as
DeepSeek and Qwen publish it) into our decoder.

Non-expert tensors load by name (our parameter names mirror HF's; the router lives at
``mlp.experts.gate`` here and ``mlp.gate`` in HF). Routed experts are read expert by expert,
ONLY for the experts this rank owns: every expert is its own checkpoint key, and
``CheckpointReader`` reads just that key's bytes from the memory-mapped shard, so a DWDP rank
never materialises the other ranks' experts. With a ``DwdpManager`` the expert tensors are
allocated by ``manager.allocate`` (memory its peers can map) and registered layer by layer in
order; the caller then runs ``manager.exchange()``. With host experts (offload) the last H
experts of the slice are read into host memory and handed to the manager, which keeps them in
the node's host store; a rank rejoining a running group restores its slice from that store
(``manager.restore_layer``) instead of reading the checkpoint. The routed experts are kept in
the MoE backend's layout (``moe/layouts.py``): for cutedsl each NVFP4 expert's bytes are
permuted in place right after reading (``preshuffled``, what the sm90 kernel reads; within each
expert, so DWDP copies whole experts as they are), and the layer's weights and its DWDP
registration are tagged with it; restored slices are in the group's layout already.
Checkpoints on disk stay linear. Before the model is allocated or any weight read, the shard
headers are checked against what the load reads (``checkpoint_check``: names, shapes, dtypes,
FP8 scales and their block grid). In an FP8 checkpoint the projection linears load into
``Fp8Linear`` (e4m3 weight + ``weight_scale_inv``, by name) and the routed experts into the fp8
expert tensors (``moe/specs.py``).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from tensorrt_llm_dwdp.model.builder import build_model
from tensorrt_llm_dwdp.model.checkpoint_check import DENSE_DTYPES, check_dense, check_experts
from tensorrt_llm_dwdp.model.config import ModelConfig
from tensorrt_llm_dwdp.model.decoder import CausalLM
from tensorrt_llm_dwdp.model.deepseek_v3 import MlaAttention
from tensorrt_llm_dwdp.model.fp8_linear import Fp8Linear
from tensorrt_llm_dwdp.model.expert_convert import Allocator, load_layer_experts
from tensorrt_llm_dwdp.model.hf_names import detect_quant
from tensorrt_llm_dwdp.model.moe_block import make_moe
from tensorrt_llm_dwdp.model.safetensors_io import CheckpointReader
from tensorrt_llm_dwdp.moe.backends import (check_nvfp4_compute, expert_weight_layout,
                                          get_backend)
from tensorrt_llm_dwdp.moe.layouts import LINEAR, shuffle_experts_
from tensorrt_llm_dwdp.quant.nvfp4 import dequantize_nvfp4

logger = logging.getLogger(__name__)

_OUR_GATE, _HF_GATE = ".mlp.experts.gate.", ".mlp.gate."


def hf_name(name: str) -> str:
    """Our state-dict name -> the checkpoint's key."""
    return name.replace(_OUR_GATE, _HF_GATE)


def read_config(path: str | os.PathLike) -> tuple[ModelConfig, str]:
    """``(ModelConfig, expert quant "bf16" | "nvfp4" | "fp8")`` of checkpoint folder ``path``."""
    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path}: no config.json (is this a checkpoint folder?)")
    with open(cfg_file, encoding="utf-8") as f:
        hf = json.load(f)
    return ModelConfig.from_hf(hf), detect_quant(path, hf)


def _read_dense(reader: CheckpointReader, key: str, shape: tuple[int, ...],
                dtype: torch.dtype) -> torch.Tensor:
    """A non-expert tensor for a parameter of ``dtype``; an NVFP4 linear weight (uint8 +
    weight_scale) is dequantized, an FP8 one (the parameter is e4m3) is read as it is."""
    t = reader.get(key)
    if dtype == torch.float8_e4m3fn:
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{key}: {t.dtype} {tuple(t.shape)}, expected float8_e4m3fn {shape}")
        return t
    if t.dtype == torch.uint8 and key.endswith(".weight"):
        base = key[: -len("weight")]
        scale_key, g_key = base + "weight_scale", base + "weight_scale_2"
        if scale_key not in reader or g_key not in reader:
            raise ValueError(f"{key} is uint8 but {scale_key} / {g_key} are missing")
        t = dequantize_nvfp4(t, reader.get(scale_key), reader.get(g_key).float().reshape(()))
    if tuple(t.shape) != shape:
        raise ValueError(f"{key}: shape {tuple(t.shape)} != expected {shape}")
    if t.dtype not in DENSE_DTYPES:
        # fp8 (block-scaled) or integer data cast to bf16 without its scales would load as
        # silently wrong weights.
        raise ValueError(f"{key}: dtype {t.dtype} is not a plain float ({', '.join(map(str, DENSE_DTYPES))})"
                         f" nor an NVFP4 uint8 .weight with weight_scale / weight_scale_2")
    return t


def load_dense_weights(model: CausalLM, reader: CheckpointReader) -> None:
    """Fill every non-expert parameter and buffer of ``model`` from ``reader``."""
    tie = model.config.tie_word_embeddings
    for name, dst in model.state_dict().items():
        key = hf_name(name)
        if key == "lm_head.weight" and tie and key not in reader:
            key = "model.embed_tokens.weight"
        if key not in reader:
            raise KeyError(f"checkpoint {reader.path} lacks tensor {key!r} (for parameter {name})")
        with torch.no_grad():
            dst.copy_(_read_dense(reader, key, tuple(dst.shape), dst.dtype))


def prepare_fp8_decode_(model: CausalLM, dtype: torch.dtype = torch.bfloat16) -> int:
    """Dequantize every FP8 ``kv_b_proj`` of MLA once, now, for the latent-space decode
    (``Fp8Linear.dequantized_weight``): the memory (DeepSeek-V3: 32 MiB per layer in bf16) is
    then taken before the engine sizes its KV cache, not at the first decode. Returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, MlaAttention) and isinstance(module.kv_b_proj, Fp8Linear):
            module.kv_b_proj.dequantized_weight(dtype)
            count += 1
    return count


def load_moe_experts(
    reader: CheckpointReader,
    config: ModelConfig,
    quant: str,
    experts: range,
    alloc: Allocator,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[int, dict[str, torch.Tensor]]:
    """``{moe_layer: {storage name: tensor [len(experts), ...]}}`` for experts ``experts`` only."""
    if not (0 <= experts.start < experts.stop <= config.num_experts and experts.step == 1):
        raise ValueError(f"expert range {experts} must be a non-empty part of [0, {config.num_experts})")
    return {
        layer: load_layer_experts(reader, layer, experts, quant, config.hidden_size,
                                  config.moe_intermediate_size, alloc, dtype)
        for layer in config.moe_layer_indices
    }


def load_model(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    moe_backend: str = "torch",
    dwdp: Any = None,
    ep: Any = None,
    weight_layout: str | None = None,
    nvfp4_compute: str = "bf16",
) -> CausalLM:
    """Build the decoder of checkpoint ``path`` and load its weights.

    ``dwdp``: a ``DwdpManager``; the rank then loads only ``dwdp.layout.owned_range()``,
    allocates expert tensors with ``dwdp.allocate`` and calls ``dwdp.register_layer`` for each
    MoE layer in order (the caller runs ``dwdp.exchange()`` afterwards): its first
    ``dwdp.resident_experts`` experts on the device, the rest (host experts) in host memory.
    Without it every expert is loaded into ordinary ``device`` memory. ``ep``: an
    ``ExpertParallel``; the rank loads only ``ep.local_range`` and its MoE layers send tokens
    to their experts' owners. ``weight_layout``: the byte order the routed experts are kept in
    (``moe/layouts.py``); None or "auto" picks the backend's (cutedsl: ``preshuffled``, the
    torch backends: ``linear``; they also read ``preshuffled``, unshuffling it exactly), a
    layout the backend cannot read, or the checkpoint cannot be in, fails before any read.
    ``nvfp4_compute``: "bf16" (W4A16) or "fp8" (W4A8, cutedsl only; ``quant/w4a8.py``) for
    NVFP4 experts, checked before any read.
    """
    check_nvfp4_compute(moe_backend, nvfp4_compute)
    config, quant = read_config(path)
    if config.moe_layer_indices:
        try:
            weight_layout = expert_weight_layout(moe_backend, weight_layout, quant,
                                                 config.hidden_size, config.moe_intermediate_size)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    else:
        weight_layout = LINEAR
    device = torch.device(device)
    if ep is not None:
        if ep.num_experts != config.num_experts:
            raise ValueError(f"expert parallelism over {ep.num_experts} experts but {path} has "
                             f"{config.num_experts}")
        first, end = ep.local_range
        resident_end = end

        def alloc(shape, dt):
            return torch.empty(shape, dtype=dt, device=device)
    elif dwdp is not None:
        layout = dwdp.layout
        if layout.num_experts != config.num_experts:
            raise ValueError(
                f"DWDP layout has {layout.num_experts} experts but {path} has {config.num_experts}"
            )
        first, end = layout.owned_range()
        resident_end = first + dwdp.resident_experts
        alloc: Allocator = dwdp.allocate
    else:
        first, end = 0, config.num_experts
        resident_end = end

        def alloc(shape, dt):
            return torch.empty(shape, dtype=dt, device=device)

    def host_alloc(shape, dt):
        return torch.empty(shape, dtype=dt)

    restoring = dwdp is not None and dwdp.restores_experts

    # One backend object for every MoE layer: a JIT-compiling backend (cutedsl) then compiles
    # each kernel configuration once per process rather than once per layer.
    backend = (get_backend(moe_backend, nvfp4_compute) if config.moe_layer_indices
               else moe_backend)
    with torch.device("meta"):
        model = build_model(config, lambda i: make_moe(config, i, backend, dwdp, ep), dtype)
    with CheckpointReader(path) as reader:
        check_dense(reader, {hf_name(n): (tuple(t.shape), t.dtype)
                             for n, t in model.state_dict().items()},
                    config.tie_word_embeddings)
        if config.moe_layer_indices and not restoring:
            check_experts(reader, config.moe_layer_indices, range(first, end), quant,
                          config.hidden_size, config.moe_intermediate_size)
        model = model.to_empty(device=device)
        load_dense_weights(model, reader)
        prepare_fp8_decode_(model, dtype)
        if config.moe_layer_indices:
            host = {}
            if restoring:
                experts = {layer: dwdp.restore_layer(layer, weight_layout=weight_layout)
                           for layer in config.moe_layer_indices}
            else:
                experts = load_moe_experts(reader, config, quant, range(first, resident_end),
                                           alloc, dtype)
                if resident_end < end:
                    host = load_moe_experts(reader, config, quant, range(resident_end, end),
                                            host_alloc, dtype)
                if weight_layout != LINEAR:
                    for tensors in (*experts.values(), *host.values()):
                        shuffle_experts_(tensors)
            moes = model.moe_modules()
            for layer, tensors in experts.items():
                moes[layer].set_local_weights(tensors, weight_layout)
                if dwdp is not None:
                    dwdp.register_layer(layer, tensors, host.get(layer),
                                        weight_layout=weight_layout)
        logger.info(
            "loaded %s (%s experts %s%s, range [%d, %d)%s): %.3f GB read",
            path, config.architecture, quant if config.moe_layer_indices else "-",
            f" {weight_layout}" if weight_layout != LINEAR else "", first, end,
            f", [{resident_end}, {end}) to host memory" if resident_end < end else "",
            reader.bytes_read / 1e9,
        )
    return model.eval()

