"""Synthetic HF-layout checkpoints from a named real config, with real tensor shapes.

Nothing is downloaded: weights are random (N(0, 0.02^2), norms 1, a small random DeepSeek
correction bias), generated tensor by tensor in checkpoint order and streamed into shards, so
even the full DeepSeek-V3 shapes never need more than one shard in memory. Routed experts are
bf16, NVFP4 in ModelOpt's layout (plus ``hf_quant_config.json``) or FP8 block 128. Synthetic
NVFP4 experts are drawn directly in the quantized domain (uniform e2m1 codes, e4m3 block
scales in [224, 448], a global scale giving std ~0.02): a valid NVFP4 tensor at no quantization
cost, which matters for DeepSeek-V3's 768 expert matrices per layer.
``quantize_experts_modelopt`` converts a bf16 HF state dict with ModelOpt's recipe instead. An
FP8 checkpoint is what DeepSeek and Qwen publish: ``config.json`` declares
``quantization_config`` (``hf_names.fp8_quant_config``) and every projection linear, dense and
expert, is drawn in bf16 and quantized with the checkpoints' recipe
(``quant.fp8.quantize_weight_blocks``: e4m3 ``weight`` + float32 ``weight_scale_inv`` per
128x128 block); embeddings, norms, the router and ``lm_head`` stay bf16 (the correction bias
fp32). A byte-level tokenizer is written alongside.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from tensorrt_llm_dwdp.model.builder import dense_param_specs
from tensorrt_llm_dwdp.model.config import ModelConfig
from tensorrt_llm_dwdp.model.hf_names import (
    BF16, FP8, FP8_SCALE_SUFFIX, HF_QUANT_CONFIG, NVFP4, PROJS, expert_key, fp8_quant_config,
    hf_quant_config, router_keys,
)
from tensorrt_llm_dwdp.model.safetensors_io import ShardedWriter
from tensorrt_llm_dwdp.model.tokenizer import ByteTokenizer
from tensorrt_llm_dwdp.moe.specs import check_sizes
from tensorrt_llm_dwdp.quant.fp8 import quantize_weight_blocks
from tensorrt_llm_dwdp.quant.nvfp4 import (
    E2M1_MAX, E2M1_VALUES, E4M3_MAX, global_scale_from_amax, quantize_nvfp4,
)

logger = logging.getLogger(__name__)

WEIGHT_STD = 0.02
# ModelOpt's activation scale is amax / (6 * 448); a synthetic checkpoint assumes amax = 1.
SYNTHETIC_INPUT_SCALE = 1.0 / (E2M1_MAX * E4M3_MAX)
_E2M1_RMS = (sum(v * v for v in E2M1_VALUES) / len(E2M1_VALUES)) ** 0.5
_SCALE_LOW, _SCALE_HIGH = 224.0, 448.0
_SCALE_RMS = ((_SCALE_HIGH**3 - _SCALE_LOW**3) / (3 * (_SCALE_HIGH - _SCALE_LOW))) ** 0.5


_CHUNK = 1 << 24  # elements drawn per randn call: bounds the fp32 temporary to 64 MiB


def random_normal(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype = torch.bfloat16,
                  std: float = WEIGHT_STD) -> torch.Tensor:
    """N(0, std^2) in ``dtype``, drawn in chunks so no full-size fp32 temporary exists
    (DeepSeek-V3's embedding is 0.9 G elements)."""
    out = torch.empty(shape, dtype=dtype, device=gen.device)
    flat = out.view(-1)
    for i in range(0, flat.numel(), _CHUNK):
        n = min(_CHUNK, flat.numel() - i)
        flat[i:i + n] = torch.randn(n, generator=gen, device=gen.device) * std
    return out


@dataclass(frozen=True)
class SyntheticSummary:
    path: str
    shards: tuple[str, ...]
    total_bytes: int
    num_tensors: int


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else -1


def expert_tensors(layer: int, expert: int, hidden: int, inter: int, quant: str,
                   gen: torch.Generator, dtype: torch.dtype = torch.bfloat16
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """One expert's HF tensors (gate, up, down): bf16, ModelOpt-layout NVFP4 or FP8 block 128."""
    for proj in PROJS:
        rows, k = (hidden, inter) if proj == "down_proj" else (inter, hidden)
        if quant == BF16:
            yield expert_key(layer, expert, proj), random_normal((rows, k), gen, dtype)
            continue
        if quant == FP8:
            q, scale_inv = quantize_weight_blocks(random_normal((rows, k), gen, dtype))
            yield expert_key(layer, expert, proj), q
            yield expert_key(layer, expert, proj, FP8_SCALE_SUFFIX), scale_inv
            continue
        packed = torch.randint(0, 256, (rows, k // 2), generator=gen, dtype=torch.uint8,
                               device=gen.device)
        scale = torch.rand(rows, k // 16, generator=gen, device=gen.device) * (
            _SCALE_HIGH - _SCALE_LOW) + _SCALE_LOW
        yield expert_key(layer, expert, proj, "weight"), packed
        yield expert_key(layer, expert, proj, "weight_scale"), scale.to(torch.float8_e4m3fn)
        yield expert_key(layer, expert, proj, "weight_scale_2"), torch.tensor(WEIGHT_STD / (_E2M1_RMS * _SCALE_RMS))
        yield expert_key(layer, expert, proj, "input_scale"), torch.tensor(SYNTHETIC_INPUT_SCALE)


def quantize_experts_modelopt(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every routed expert ``...experts.{e}.{proj}.weight`` (float) of an HF state dict
    by ModelOpt NVFP4 tensors (``weight``, ``weight_scale``, ``weight_scale_2``,
    ``input_scale``); other tensors pass through. As ModelOpt does for a fused gate/up pair,
    ``gate_proj`` and ``up_proj`` of one expert share the global scale of their joint amax."""
    out = {}
    for name, t in state_dict.items():
        if ".mlp.experts." not in name or not name.endswith("_proj.weight") or not t.is_floating_point():
            out[name] = t
            continue
        base = name[: -len("weight")]
        amax = t.abs().amax()
        for a, b in (("gate_proj.", "up_proj."), ("up_proj.", "gate_proj.")):
            partner = name.replace(a, b) if a in name else None
            if partner is not None and partner in state_dict:
                amax = torch.maximum(amax, state_dict[partner].abs().amax())
        gs = global_scale_from_amax(amax)
        q = quantize_nvfp4(t, gs if gs > 0 else None)
        out[base + "weight"] = q.packed
        out[base + "weight_scale"] = q.scale
        out[base + "weight_scale_2"] = q.global_scale.reshape(())
        out[base + "input_scale"] = torch.tensor(SYNTHETIC_INPUT_SCALE)
    return out


def synthetic_tensors(config: ModelConfig, quant: str, seed: int = 0,
                      dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint for ``config`` in layer order, generated lazily on
    ``device`` (its generator seeded with ``seed``: a CUDA draw differs from the CPU's)."""
    if quant not in (BF16, NVFP4, FP8):
        raise ValueError(f"quant must be {BF16!r}, {NVFP4!r} or {FP8!r}, got {quant!r}")
    if (quant == FP8) != (config.linear_quant == FP8):
        raise ValueError(f"quant {quant!r} does not match the config's linears "
                         f"({config.linear_quant!r}); build the config with synthetic_config()")
    gen = torch.Generator(device=device).manual_seed(seed)
    dense = dense_param_specs(config, dtype)
    by_layer: dict[int, list[str]] = {}
    for name in dense:
        if not name.endswith("." + FP8_SCALE_SUFFIX):  # written with its weight
            by_layer.setdefault(_layer_of(name), []).append(name)

    def dense_tensors(name: str) -> Iterator[tuple[str, torch.Tensor]]:
        shape, dt = dense[name]
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=dtype)
        elif dt == torch.float8_e4m3fn:
            q, scale_inv = quantize_weight_blocks(random_normal(shape, gen, dtype))
            yield name, q
            yield name[: -len("weight")] + FP8_SCALE_SUFFIX, scale_inv
        else:
            yield name, random_normal(shape, gen, dt)

    top = by_layer.get(-1, [])
    head = [n for n in top if n.startswith("model.embed_tokens")]
    tail = [n for n in top if n not in head]
    for name in head:
        yield from dense_tensors(name)
    moe = set(config.moe_layer_indices)
    h, inter, e = config.hidden_size, config.moe_intermediate_size, config.num_experts
    if moe:
        check_sizes(quant, h, inter)
    for layer in range(config.num_layers):
        for name in by_layer.get(layer, []):
            yield from dense_tensors(name)
        if layer not in moe:
            continue
        keys = router_keys(layer, config.is_deepseek)
        yield keys["weight"], random_normal((e, h), gen, dtype)
        if "e_score_correction_bias" in keys:
            yield keys["e_score_correction_bias"], torch.randn(e, generator=gen,
                                                               device=gen.device) * 0.01
        for expert in range(e):
            yield from expert_tensors(layer, expert, h, inter, quant, gen, dtype)
    for name in tail:
        yield from dense_tensors(name)


def synthetic_config(hf_config: dict[str, Any], quant: str) -> dict[str, Any]:
    """The ``config.json`` a synthetic ``quant`` checkpoint of ``hf_config`` carries: the
    byte tokenizer's bos/eos, bf16, and for FP8 the checkpoints' ``quantization_config``
    (Qwen3's also lists its routers and ``lm_head`` in ``modules_to_not_convert``, as
    Qwen3-*-FP8 does)."""
    config = ModelConfig.from_hf({k: v for k, v in hf_config.items() if k != "quantization_config"})
    tok = ByteTokenizer(config.vocab_size)
    hf = dict(hf_config)
    hf.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, torch_dtype="bfloat16")
    hf.pop("quantization_config", None)
    if quant == FP8:
        skip = None if config.is_deepseek else ["lm_head"] + [
            f"model.layers.{i}.mlp.gate" for i in config.moe_layer_indices]
        hf["quantization_config"] = fp8_quant_config(skip)
    return hf


def write_synthetic_checkpoint(out: str | os.PathLike, hf_config: dict[str, Any], *, quant: str = BF16,
                               seed: int = 0, shard_bytes: int = 4 << 30,
                               device: str | torch.device = "cpu") -> SyntheticSummary:
    """Write config.json, the weights (sharded), hf_quant_config.json (NVFP4) and a byte
    tokenizer into ``out``. ``hf_config`` is an HF config dict (e.g. from ``presets``); its
    bos/eos ids are set to the byte tokenizer's (``synthetic_config``). Expert sizes that do not
    fit ``quant`` are refused before anything is written. ``device``: where weights are drawn
    and quantized (``cuda`` makes FP8 at DeepSeek-V3 shapes minutes faster; other draws)."""
    hf = synthetic_config(hf_config, quant)
    config = ModelConfig.from_hf(hf)
    if config.moe_layer_indices:
        check_sizes(quant, config.hidden_size, config.moe_intermediate_size)
    tok = ByteTokenizer(config.vocab_size)
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    writer = ShardedWriter(out, shard_bytes)
    count = 0
    for name, tensor in synthetic_tensors(config, quant, seed, device=device):
        writer.add(name, tensor.cpu())
        count += 1
    shards = writer.finish()
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
    if quant == NVFP4:
        with open(os.path.join(out, HF_QUANT_CONFIG), "w", encoding="utf-8") as f:
            json.dump(hf_quant_config(NVFP4), f, indent=2)
    tok.save(out)
    logger.info("wrote %d tensors, %.3f GB in %d shard(s) to %s", count, writer.total_bytes / 1e9, len(shards), out)
    return SyntheticSummary(out, tuple(shards), writer.total_bytes, count)
