"""Build the benchmark's DeepSeek-V3-shaped NVFP4 model slice on the device, one mode at a time.

The slice is a preset's decoder (MLA attention, the preset's dense first layers, then
``num_moe_layers`` MoE layers with shared experts) built by the project's model code, with
synthetic weights generated and quantized directly on the device (no checkpoint). Every weight
is a pure function of (seed, parameter name) or (seed, layer, global expert), so all modes and
all ranks see the same model and the outputs of the three modes can be compared.

Modes (``S`` ranks, ``E`` experts, ``L`` MoE layers), and the routed experts each rank holds:

- ``dwdp``: its slice of W experts per layer in memory peers can map (``DwdpManager.allocate``),
  plus the manager's two prefetch buffers: ``L*W + 2*(S-1)*P`` experts;
- ``replicated``: all E per layer (``L*E``): the speed upper bound and the memory worst case;
- ``ep``: its E/S per layer (``L*E/S``), tokens dispatched to their owners and back by the
  ``ExpertParallel`` the caller passes (``parallel/``: the same ConfigurableMoE and backend).
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from tensorrt_llm_dwdp.model.builder import build_model
from tensorrt_llm_dwdp.model.config import ModelConfig
from tensorrt_llm_dwdp.model.decoder import CausalLM
from tensorrt_llm_dwdp.model.memory import in_use
from tensorrt_llm_dwdp.model.moe_block import make_moe
from tensorrt_llm_dwdp.model.presets import get_preset
from tensorrt_llm_dwdp.moe import specs
from tensorrt_llm_dwdp.moe.backends import native_layout, to_native_layout_
from tensorrt_llm_dwdp.parallel.expert_parallel import ExpertParallel
from tensorrt_llm_dwdp.quant.fp8 import quantize_weight_blocks
from tensorrt_llm_dwdp.quant.nvfp4 import quantize_nvfp4_per_leading

logger = logging.getLogger(__name__)

MODES = ("dwdp", "replicated", "ep")
WEIGHT_STD = 0.02
QUANT_CHUNK = 16  # experts generated + quantized at once (bounds the fp32 scratch)


def bench_config(preset: str, num_moe_layers: int, vocab_size: int) -> ModelConfig:
    """``preset`` with its own dense first layers followed by ``num_moe_layers`` MoE layers."""
    if num_moe_layers < 2:
        raise ValueError(f"num_moe_layers must be >= 2 (the ping-pong needs two), got {num_moe_layers}")
    first_dense = int(get_preset(preset).get("first_k_dense_replace", 0))
    hf = get_preset(preset, num_layers=first_dense + num_moe_layers, vocab_size=vocab_size)
    config = ModelConfig.from_hf(hf)
    if len(config.moe_layer_indices) != num_moe_layers:
        raise ValueError(
            f"preset {preset!r} with {first_dense + num_moe_layers} layers has MoE layers "
            f"{config.moe_layer_indices}, not {num_moe_layers}"
        )
    return config


def expert_shapes(config: ModelConfig, n: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes/dtypes of ``n`` NVFP4 experts of ``config`` (``moe/specs.py``)."""
    return specs.expert_shapes(specs.NVFP4, n, config.hidden_size, config.moe_intermediate_size)


def expert_nbytes(config: ModelConfig) -> int:
    """Bytes of one NVFP4 expert (weights + block scales + global scales)."""
    return specs.expert_nbytes(specs.NVFP4, config.hidden_size, config.moe_intermediate_size)


def _seed_of(seed: int, *parts: object) -> int:
    return zlib.crc32(repr((seed, *parts)).encode()) & 0x7FFFFFFF


def fill_experts(dst: dict[str, torch.Tensor], config: ModelConfig, layer: int,
                 first_expert: int, seed: int) -> None:
    """Write global experts ``[first_expert, first_expert + n)`` of ``layer`` into ``dst``
    (tensors of ``expert_shapes(config, n)``), generated and quantized on ``dst``'s device."""
    n = dst["w3_w1_weight"].shape[0]
    h, i = config.hidden_size, config.moe_intermediate_size
    device = dst["w3_w1_weight"].device
    for c in range(0, n, QUANT_CHUNK):
        m = min(QUANT_CHUNK, n - c)
        w13 = torch.empty(m, 2 * i, h, dtype=torch.bfloat16, device=device)
        w2 = torch.empty(m, h, i, dtype=torch.bfloat16, device=device)
        for j in range(m):
            g = torch.Generator(device=device).manual_seed(_seed_of(seed, "expert", layer, first_expert + c + j))
            w13[j] = torch.randn(2 * i, h, generator=g, device=device) * WEIGHT_STD
            w2[j] = torch.randn(h, i, generator=g, device=device) * WEIGHT_STD
        for prefix, w, alpha in (("w3_w1", w13, "fc31_alpha"), ("w2", w2, "fc2_alpha")):
            q = quantize_nvfp4_per_leading(w)
            dst[f"{prefix}_weight"][c:c + m].copy_(q.packed)
            dst[f"{prefix}_weight_scale"][c:c + m].copy_(q.scale)
            dst[alpha][c:c + m].copy_(q.global_scale)
        del w13, w2


def init_dense(model: nn.Module, seed: int) -> None:
    """Every parameter by name: norms 1, the rest N(0, 0.02^2); the routers' correction-bias
    buffers small positive; each from its own generator on its own device. Other buffers
    (derived state) are left as built. An FP8 linear's e4m3 ``weight`` is that draw quantized
    with the checkpoints' recipe, its ``weight_scale_inv`` filled with it."""
    bias = [(n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in list(params.items()) + bias:
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                t.fill_(1.0)
                continue
            if name.endswith(".weight_scale_inv"):
                continue  # filled with its weight
            g = torch.Generator(device=t.device).manual_seed(_seed_of(seed, name))
            if t.dtype == torch.float8_e4m3fn:
                w = torch.randn(t.shape, generator=g, device=t.device, dtype=torch.float32)
                q, scale_inv = quantize_weight_blocks(w * WEIGHT_STD)
                t.copy_(q)
                params[name[: -len("weight")] + "weight_scale_inv"].copy_(scale_inv)
            elif name.endswith("e_score_correction_bias"):
                t.copy_(torch.rand(t.shape, generator=g, device=t.device, dtype=torch.float32) * 1e-2)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g, device=t.device, dtype=torch.float32) * WEIGHT_STD)


@dataclass
class BenchModel:
    """One mode's model on one rank and what it holds."""

    mode: str
    model: CausalLM
    manager: Any                 # DwdpManager in dwdp mode, else None
    ep: ExpertParallel | None
    loaded_bytes: int            # allocator (GPU) / RSS (CPU) after building minus before
    memory_source: str           # "cuda_allocator" or "rss"
    tensor_bytes: int            # routed-expert tensors' sizes (incl. DWDP buffers): a diagnostic
    predicted_expert_bytes: int  # what the layout formula says

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()
            self.manager = None


def build_bench_model(mode: str, config: ModelConfig, *, device: torch.device, backend: Any,
                      rank: int, world_size: int, seed: int, dwdp_config: Any = None,
                      ep: ExpertParallel | None = None,
                      manager_factory: Callable[..., Any] | None = None) -> BenchModel:
    """Build ``mode``'s model on ``device`` for this rank. ``backend``: a MoE backend object.

    dwdp needs ``dwdp_config`` (W = P = E/S here) and ``manager_factory(config, E, device)``
    (``DwdpManager.from_environment``); ep needs ``ep`` (its group, exchange and spans).
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; choose one of {MODES}")
    before = in_use(device)
    e, moe_layers = config.num_experts, config.moe_layer_indices
    per_expert = expert_nbytes(config)
    manager = None
    locals_: dict[int, dict[str, torch.Tensor]] = {}

    if mode == "dwdp":
        manager = manager_factory(dwdp_config, e, device)
        layout = manager.layout
        first, count = layout.owned_range()[0], layout.num_experts_per_worker
        alloc = manager.allocate
    elif mode == "replicated":
        first, count = 0, e
        alloc = lambda shape, dtype: torch.empty(shape, dtype=dtype, device=device)  # noqa: E731
    else:
        if ep is None:
            raise ValueError("mode 'ep' needs an ExpertParallel (ep=...)")
        first, end = ep.local_range
        count = end - first
        alloc = lambda shape, dtype: torch.empty(shape, dtype=dtype, device=device)  # noqa: E731

    try:
        for layer in moe_layers:
            t = {name: alloc(shape, dtype) for name, (shape, dtype) in expert_shapes(config, count).items()}
            fill_experts(t, config, layer, first, seed)
            weight_layout = to_native_layout_(t, backend)  # what the backend reads
            locals_[layer] = t
            if manager is not None:
                manager.register_layer(layer, t, weight_layout=weight_layout)

        def factory(layer_idx: int) -> nn.Module:
            moe = make_moe(config, layer_idx, backend=backend, dwdp=manager,
                           ep=ep if mode == "ep" else None)
            moe.set_local_weights(locals_[layer_idx], native_layout(moe.backend))
            return moe

        with torch.device(device):
            model = build_model(config, factory)
        model.eval()
        init_dense(model, seed)
        if manager is not None:
            manager.exchange()
    except BaseException:
        if manager is not None:
            manager.close()
        raise

    after = in_use(device)
    resident = sum(t.numel() * t.element_size() for d in locals_.values() for t in d.values())
    n_layers = len(moe_layers)
    if mode == "dwdp":
        resident += manager.buffer_bytes
        lay = manager.layout
        predicted = (n_layers * lay.num_experts_per_worker + lay.buffered_experts) * per_expert
        if manager.expert_view == "composite":  # plus its page rounding and edges
            from tensorrt_llm_dwdp.dwdp.composite_layout import footprint

            names = {n: t[0].numel() * t.element_size() for n, t in locals_[moe_layers[0]].items()}
            fp = footprint(lay, [names] * n_layers, manager.page_bytes)
            predicted = fp.own_bytes + fp.pool_bytes
    elif mode == "replicated":
        predicted = n_layers * e * per_expert
    else:
        predicted = n_layers * (e // world_size) * per_expert
    logger.info("rank %d built %s: %.2f GiB of routed-expert tensors, %.2f GiB in use (%s)", rank,
                mode, resident / 2**30, (after - before) / 2**30, after.source)
    return BenchModel(mode, model, manager, ep if mode == "ep" else None, after - before, after.source, resident,
                      predicted)
