"""HF checkpoint key names and quantization metadata (ModelOpt NVFP4).

Routed experts are stored one module per expert, as in the published checkpoints:
``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``. In a ModelOpt NVFP4 export
each such module has ``.weight`` (uint8 ``[N, K/2]``, two e2m1 per byte, low nibble first),
``.weight_scale`` (float8_e4m3fn ``[N, K/16]``), ``.weight_scale_2`` (fp32 scalar, the global
scale) and ``.input_scale`` (fp32 scalar, the activation scale; unused here: activations stay
bf16, W4A16). The quantization is declared by ``hf_quant_config.json``
(``{"quantization": {"quant_algo": "NVFP4", ...}}``) or by ``config.json``'s
``quantization_config.quant_algo``.
"""
from __future__ import annotations

import json
import os
from typing import Any

PROJS = ("gate_proj", "up_proj", "down_proj")
NVFP4_SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "input_scale")
HF_QUANT_CONFIG = "hf_quant_config.json"
BF16 = "bf16"
NVFP4 = "nvfp4"


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


def detect_quant(path: str, hf_config: dict[str, Any]) -> str:
    """``"nvfp4"`` when the checkpoint declares ModelOpt NVFP4, ``"bf16"`` when it declares no
    quantization; anything else is refused with the algorithm named."""
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
    raise ValueError(f"{path}: quantization {algo!r} is not supported (NVFP4 or none)")
