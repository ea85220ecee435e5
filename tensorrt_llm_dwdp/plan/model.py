"""The MoE model a plan is made for: sizes read from a Hugging Face ``config.json``.

``resolve_model`` accepts a name the planner knows (``deepseek-r1-nvfp4``), one of our presets
(``deepseek-v3``), an aiconfigurator-core bundled config (``deepseek-ai/DeepSeek-V3`` or its file
stem ``deepseek-ai--DeepSeek-V3``) or a path to a ``config.json`` (or the folder holding it).
Expert bytes come from ``moe/specs.py``; FP8 block-scaled experts are e4m3 weights plus one fp32
scale per 128x128 block.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from tensorrt_llm_dwdp.model.presets import PRESETS
from tensorrt_llm_dwdp.moe.specs import BF16, NVFP4, expert_nbytes

FP8 = "fp8"
QUANTS = (NVFP4, FP8)
FP8_BLOCK = 128

# name -> (aiconfigurator-core model id, expert quantization)
KNOWN_MODELS: dict[str, tuple[str, str]] = {
    "deepseek-r1-nvfp4": ("deepseek-ai/DeepSeek-R1", NVFP4),
    "deepseek-r1-fp8": ("deepseek-ai/DeepSeek-R1", FP8),
    "deepseek-v3-nvfp4": ("deepseek-ai/DeepSeek-V3", NVFP4),
    "deepseek-v3-fp8": ("deepseek-ai/DeepSeek-V3", FP8),
}
# NVIDIA's NVFP4 DeepSeek checkpoints (DeepSeek-R1-0528-FP4-v2, the one blog 19 serves, and
# DeepSeek-V3.1-NVFP4) keep the q/kv attention projections in bf16 and quantize o_proj and the
# MLPs to NVFP4. aiconfigurator-core bundles that layout (same shapes as R1 / V3) with its
# hf_quant_config as nvidia/DeepSeek-V3.1-NVFP4; compiling the FP8 checkpoints' ids at nvfp4
# instead would model every projection in NVFP4 and price attention as one fused module.
NVFP4_SERVED_AS = {"deepseek-ai/DeepSeek-R1": "nvidia/DeepSeek-V3.1-NVFP4",
                   "deepseek-ai/DeepSeek-V3": "nvidia/DeepSeek-V3.1-NVFP4"}
NVFP4_SERVED_DTYPES = {"attention q_a, q_b, kv_a, kv_b projections": "bfloat16",
                       "attention o_proj, shared expert, routed experts": "nvfp4",
                       "router, lm_head": "bfloat16", "KV cache": "fp8",
                       "context FMHA": "bfloat16 (no FP8 context-MLA rows in any database)"}
# our presets whose published checkpoint aiconfigurator-core also bundles
PRESET_AIC_IDS = {"deepseek-v3": "deepseek-ai/DeepSeek-V3", "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B"}


def aic_model_configs_dir() -> str:
    """Folder of aiconfigurator-core's bundled ``config.json`` files (raises if not installed)."""
    try:
        import aiconfigurator_core
    except ImportError as exc:
        raise RuntimeError("plan needs aiconfigurator-core: pip install -e '.[plan]'") from exc
    return os.path.join(os.path.dirname(aiconfigurator_core.__file__), "model_configs")


@dataclass(frozen=True)
class MoeModel:
    """Sizes of one MoE model; bytes per expert in the chosen quantization."""

    name: str
    aic_id: str | None          # model path aiconfigurator-core compiles offline, else None
    quant: str                  # expert storage: nvfp4 | fp8
    hidden: int
    moe_inter: int
    num_experts: int
    top_k: int
    num_layers: int
    num_moe_layers: int
    max_position: int
    non_expert_params: int      # attention, dense MLPs, shared experts, embeddings
    kv_bytes_per_token: int     # KV cache of one token over all layers (fp8 cache)

    @property
    def expert_bytes(self) -> int:
        """Bytes of ONE expert over all its tensors."""
        return _expert_bytes_cached(self.quant, self.hidden, self.moe_inter)

    @property
    def non_expert_bytes(self) -> int:
        """Non-expert weights: fp8 for FP8 checkpoints, bf16 otherwise (NVFP4 checkpoints keep
        attention and the dense layers in higher precision)."""
        return self.non_expert_params * (1 if self.quant == FP8 else 2)


def expert_bytes(quant: str, hidden: int, inter: int) -> int:
    """Bytes of one expert: NVFP4 from ``moe.specs``; FP8 block-scaled as e4m3 weights (the
    bf16 spec with a 1-byte dtype) plus fp32 scales per 128x128 block of w3_w1 and w2."""
    if quant == NVFP4:
        return expert_nbytes(NVFP4, hidden, inter)
    if quant == FP8:
        weights = expert_nbytes(BF16, hidden, inter, dtype=torch.float8_e4m3fn)
        blocks = (-(-2 * inter // FP8_BLOCK)) * (-(-hidden // FP8_BLOCK)) \
            + (-(-hidden // FP8_BLOCK)) * (-(-inter // FP8_BLOCK))
        return weights + 4 * blocks
    raise ValueError(f"unknown --quant {quant!r}; choose one of {QUANTS}")


@lru_cache(maxsize=None)
def _expert_bytes_cached(quant: str, hidden: int, inter: int) -> int:
    return expert_bytes(quant, hidden, inter)  # the simulation asks for it once per step


def _bundled_ids() -> dict[str, str]:
    out = {}
    for f in os.listdir(aic_model_configs_dir()):
        if f.endswith("_config.json") and not f.endswith("hf_quant_config.json"):
            stem = f[: -len("_config.json")]
            out[stem.replace("--", "/", 1)] = os.path.join(aic_model_configs_dir(), f)
    return out


def _offline_ids() -> set[str]:
    """Bundled configs aiconfigurator-core compiles without downloading (its DefaultHFModels)."""
    from aiconfigurator_core.sdk.common import DefaultHFModels
    return set(DefaultHFModels)


def resolve_model(spec: str, quant: str | None = None) -> MoeModel:
    """The model named by ``spec`` (see module docstring); ``quant`` overrides the name's."""
    if quant is not None and quant not in QUANTS:
        raise ValueError(f"unknown --quant {quant!r}; choose one of {QUANTS}")
    if spec in KNOWN_MODELS:
        aic_id, default_quant = KNOWN_MODELS[spec]
        if quant is not None and quant != default_quant:
            other = spec.rsplit("-", 1)[0] + "-" + quant
            raise ValueError(f"--quant {quant} contradicts --model {spec}; use --model {other}")
        q = default_quant
        return from_config(spec, _read_json(_bundled_ids()[aic_id]), _served(aic_id, q), q)
    if spec in PRESETS:
        q = quant or NVFP4
        return from_config(spec, PRESETS[spec], _served(PRESET_AIC_IDS.get(spec), q), q)
    bundled = _bundled_ids()
    aic_id = spec.replace("--", "/", 1) if "--" in spec else spec
    if aic_id in bundled:
        compiles = aic_id if aic_id in _offline_ids() else None
        q = quant or NVFP4
        return from_config(spec, _read_json(bundled[aic_id]), _served(compiles, q), q)
    path = spec
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if os.path.isfile(path):
        # aiconfigurator-core compiles a local model from the folder holding config.json
        return from_config(spec, _read_json(path), os.path.dirname(os.path.abspath(path)),
                           quant or NVFP4)
    names = sorted(KNOWN_MODELS) + sorted(PRESETS)
    raise ValueError(f"unknown model {spec!r}: not a planner name ({', '.join(names)}), not an "
                     f"aiconfigurator-core bundled config (e.g. deepseek-ai/DeepSeek-V3) and not "
                     f"a config.json path")


def _served(aic_id: str | None, quant: str) -> str | None:
    """The id aiconfigurator-core compiles for ``aic_id`` served in ``quant`` (see
    NVFP4_SERVED_AS)."""
    if quant == NVFP4 and aic_id in NVFP4_SERVED_AS:
        return NVFP4_SERVED_AS[aic_id]
    return aic_id


def _read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def from_config(name: str, cfg: dict[str, Any], aic_id: str | None, quant: str) -> MoeModel:
    """Build a ``MoeModel`` from an HF config dict (DeepSeek-V3 / Qwen3-MoE / Mixtral keys; a
    multimodal config's ``text_config`` is the language model)."""
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], **{k: v for k, v in cfg.items() if k == "quantization_config"}}
    get = cfg.get
    experts = get("n_routed_experts") or get("num_experts") or get("num_local_experts")
    inter = get("moe_intermediate_size") or get("intermediate_size")
    if not experts or not inter or not get("hidden_size"):
        raise ValueError(f"model {name!r}: config has no routed experts (n_routed_experts / "
                         f"num_experts / num_local_experts); plan is for MoE models")
    hidden, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    dense = int(get("first_k_dense_replace") or 0)
    moe_layers = layers - dense - len(get("mlp_only_layers") or [])
    heads = int(get("num_attention_heads"))
    if get("kv_lora_rank"):
        nope, rope, v = get("qk_nope_head_dim"), get("qk_rope_head_dim"), get("v_head_dim")
        kv_lora, q_lora = get("kv_lora_rank"), get("q_lora_rank")
        q = (hidden * q_lora + q_lora * heads * (nope + rope)) if q_lora else hidden * heads * (nope + rope)
        attn = q + hidden * (kv_lora + rope) + kv_lora * heads * (nope + v) + heads * v * hidden
        kv_token = (kv_lora + rope) * layers
    else:
        hd = get("head_dim") or hidden // heads
        kvh = get("num_key_value_heads") or heads
        attn = hidden * hd * (heads + 2 * kvh) + heads * hd * hidden
        kv_token = 2 * kvh * hd * layers
    shared = 3 * hidden * inter * int(get("n_shared_experts") or 0)
    dense_mlp = 3 * hidden * int(get("intermediate_size") or 0)
    params = layers * attn + dense * dense_mlp + moe_layers * shared + 2 * int(get("vocab_size", 0)) * hidden
    return MoeModel(name=name, aic_id=aic_id, quant=quant, hidden=hidden, moe_inter=int(inter),
                    num_experts=int(experts), top_k=int(get("num_experts_per_tok")),
                    num_layers=layers, num_moe_layers=moe_layers,
                    max_position=int(get("max_position_embeddings") or 0),
                    non_expert_params=int(params), kv_bytes_per_token=int(kv_token))
