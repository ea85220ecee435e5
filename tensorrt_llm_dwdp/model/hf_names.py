"""HF checkpoint key names and quantization metadata (ModelOpt NVFP4, FP8 block 128).

Routed experts are stored one module per expert, as in the published checkpoints:
``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``. In a ModelOpt NVFP4 export
each such module has ``.weight`` (uint8 ``[N, K/2]``, two e2m1 per byte, low nibble first),
``.weight_scale`` (float8_e4m3fn ``[N, K/16]``), ``.weight_scale_2`` (fp32 scalar, the global
scale) and ``.input_scale`` (fp32 scalar, the activation scale; unused here: activations stay
bf16, W4A16). The quantization is declared by ``hf_quant_config.json``
(``{"quantization": {"quant_algo": "NVFP4", ...}}``) or by ``config.json``'s
``quantization_config.quant_algo``.

FP8 (DeepSeek-V3/R1, Qwen3-*-FP8): ``config.json`` declares ``quantization_config: {quant_method:
fp8, fmt: e4m3, weight_block_size: [128, 128], activation_scheme: dynamic}`` (Qwen3 adds
``modules_to_not_convert``). Every projection linear (attention, dense MLP, shared and routed
experts) is ``.weight`` float8_e4m3fn ``[N, K]`` with ``.weight_scale_inv`` float32
``[ceil(N/128), ceil(K/128)]``; embeddings, norms, the router ``mlp.gate`` (bf16), its fp32
``e_score_correction_bias`` and ``lm_head`` stay unquantized.
"""
from __future__ import annotations

import json
import os
from typing import Any

PROJS = ("gate_proj", "up_proj", "down_proj")
NVFP4_SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "input_scale")
FP8_SCALE_SUFFIX = "weight_scale_inv"
HF_QUANT_CONFIG = "hf_quant_config.json"
BF16 = "bf16"
NVFP4 = "nvfp4"
FP8 = "fp8"
FP8_BLOCK_SIZE = [128, 128]


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}.mlp"


def expert_key(layer: int, expert: int, proj: str, suffix: str = "weight") -> str:
    return f"{layer_prefix(layer)}.experts.{expert}.{proj}.{suffix}"


def router_keys(layer: int, deepseek: bool) -> dict[str, str]:
    """HF names of a MoE layer's router tensors: ``weight`` [E, H] (and DeepSeek's fp32
    ``e_score_correction_bias`` [E])."""
    keys = {"weight": f"{layer_prefix(layer)}.gate.weight"}
    if deepseek:
        keys["e_score_correction_bias"] = f"{layer_prefix(layer)}.gate.e_score_correction_bias"
    return keys


def hf_quant_config(quant: str) -> dict[str, Any]:
    """The ``hf_quant_config.json`` a ModelOpt NVFP4 export of the routed experts carries."""
    if quant != NVFP4:
        raise ValueError(f"no quant config for {quant!r}")
    return {
        "producer": {"name": "modelopt", "version": "0.27.0"},
        "quantization": {
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": None,
            "group_size": 16,
            "exclude_modules": ["lm_head", "model.embed_tokens", "*self_attn*", "*shared_experts*",
                                "*mlp.gate", "*mlp.gate_proj", "*mlp.up_proj", "*mlp.down_proj"],
        },
    }


def fp8_quant_config(modules_to_not_convert: list[str] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` of an FP8 block-128 checkpoint (DeepSeek-V3's keys; Qwen3's
    add ``modules_to_not_convert``)."""
    qc: dict[str, Any] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                          "weight_block_size": list(FP8_BLOCK_SIZE)}
    if modules_to_not_convert:
        qc["modules_to_not_convert"] = list(modules_to_not_convert)
    return qc


def is_fp8_config(hf_config: dict[str, Any]) -> bool:
    """True when ``config.json`` declares FP8 block-128 (checked: :func:`check_fp8_config`)."""
    qc = hf_config.get("quantization_config") or {}
    if str(qc.get("quant_method", "")).lower() != FP8:
        return False
    check_fp8_config(qc)
    return True


def check_fp8_config(qc: dict[str, Any]) -> None:
    """Raise ValueError naming the field unless ``quantization_config`` is the format this
    project reads: e4m3 weights, 128x128 blocks, dynamic per-token activations."""
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"quantization_config.fmt {fmt!r} is not supported (FP8 reads e4m3)")
    block = qc.get("weight_block_size")
    if block is None or [int(b) for b in block] != FP8_BLOCK_SIZE:
        raise ValueError(f"quantization_config.weight_block_size {block!r} is not supported "
                         f"(FP8 reads {FP8_BLOCK_SIZE} blocks; per-tensor FP8 has none)")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ValueError(f"quantization_config.activation_scheme {scheme!r} is not supported "
                         "(FP8 quantizes activations per token per 128 at run time: 'dynamic')")
    skip = qc.get("modules_to_not_convert") or []
    if not isinstance(skip, list) or not all(isinstance(m, str) for m in skip):
        raise ValueError(f"quantization_config.modules_to_not_convert must be a list of module "
                         f"names, got {skip!r}")


def detect_quant(path: str, hf_config: dict[str, Any]) -> str:
    """``"nvfp4"`` when the checkpoint declares ModelOpt NVFP4, ``"fp8"`` for FP8 block 128
    (validated, :func:`check_fp8_config`), ``"bf16"`` when it declares no quantization;
    anything else is refused with the algorithm named."""
    algo = None
    qfile = os.path.join(path, HF_QUANT_CONFIG)
    if os.path.isfile(qfile):
        with open(qfile, encoding="utf-8") as f:
            algo = (json.load(f).get("quantization") or {}).get("quant_algo")
    elif hf_config.get("quantization_config"):
        qc = hf_config["quantization_config"]
        algo = qc.get("quant_algo") or qc.get("quant_method")
    if algo is None:
        return BF16
    if str(algo).upper() == "NVFP4":
        return NVFP4
    if str(algo).lower() == FP8:
        try:
            check_fp8_config(hf_config["quantization_config"])
        except ValueError as exc:
            raise ValueError(f"{path}/config.json: {exc}") from None
        return FP8
    raise ValueError(f"{path}: quantization {algo!r} is not supported (NVFP4, FP8 block 128 or "
                     "none)")
