"""Model shape and routing settings read from a Hugging Face ``config.json``.

Only the two architectures this package implements are accepted; any other ``architectures``
entry, and any missing key the decoders need, is rejected here with the key named, so a bad
checkpoint fails before a single weight is read.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from tensorrt_llm_dwdp.model.hf_names import BF16, FP8, is_fp8_config

DEEPSEEK_V3 = "DeepseekV3ForCausalLM"
QWEN3_MOE = "Qwen3MoeForCausalLM"
SUPPORTED_ARCHITECTURES = (DEEPSEEK_V3, QWEN3_MOE)

DENSE = "dense"
MOE = "moe"


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings. ``rope_type`` is ``"default"`` or ``"yarn"`` (DeepSeek).

    ``interleave``: DeepSeek stores the rotary dims as interleaved pairs (x0, x1), (x2, x3), ...
    ``mscale_all_dim``: DeepSeek's extra softmax-scale factor ``yarn_mscale(factor, m)**2``.
    """

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    interleave: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """Everything the decoders need, with one name per concept across both architectures.

    ``layer_kinds[i]`` is ``"dense"`` or ``"moe"``. DeepSeek-V3 fields (``q_lora_rank`` ...
    ``routed_scaling_factor``) are ``None``/0 for Qwen3-MoE; ``head_dim``/``num_kv_heads`` are
    the Qwen3 GQA shape (DeepSeek's MLA uses its own head dims). ``linear_quant`` is ``"fp8"``
    when ``config.json`` declares FP8 block 128: every projection linear except
    ``linear_quant_skip`` (``modules_to_not_convert``) then holds e4m3 weights and block scales.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    layer_kinds: tuple[str, ...]
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # DeepSeek-V3 (MLA + shared experts + group-limited sigmoid routing)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    n_shared_experts: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    linear_quant: str = BF16
    linear_quant_skip: tuple[str, ...] = ()

    @property
    def is_deepseek(self) -> bool:
        return self.architecture == DEEPSEEK_V3

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        return tuple(i for i, kind in enumerate(self.layer_kinds) if kind == MOE)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Build from a parsed HF ``config.json`` dict."""
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"config.json architectures={archs!r} is not supported; expected one of "
                f"{list(SUPPORTED_ARCHITECTURES)}"
            )
        config = _deepseek(hf) if arch == DEEPSEEK_V3 else _qwen3(hf)
        if is_fp8_config(hf):
            skip = tuple(hf["quantization_config"].get("modules_to_not_convert") or ())
            config = dataclasses.replace(config, linear_quant=FP8, linear_quant_skip=skip)
        _check_ranges(config)
        return config

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read ``path`` (a ``config.json`` or the folder holding it)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path}")
        with open(path, encoding="utf-8") as f:
            return cls.from_hf(json.load(f))


def _need(hf: Mapping[str, Any], key: str, arch: str) -> Any:
    if key not in hf or hf[key] is None:
        raise KeyError(f"config.json of {arch} lacks required key {key!r}")
    return hf[key]


def _rope(hf: Mapping[str, Any], arch: str, interleave: bool) -> RopeConfig:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", scaling.get("rope_theta"))
    if theta is None:
        raise KeyError(f"config.json of {arch} lacks required key 'rope_theta'")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported (default, yarn)")
    if rope_type == "default":
        return RopeConfig(theta=float(theta), interleave=interleave)
    for key in ("factor", "original_max_position_embeddings"):
        if key not in scaling:
            raise KeyError(f"config.json of {arch}: rope_scaling (yarn) lacks {key!r}")
    return RopeConfig(
        theta=float(theta),
        rope_type="yarn",
        factor=float(scaling["factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        beta_fast=float(scaling.get("beta_fast") or 32),
        beta_slow=float(scaling.get("beta_slow") or 1),
        mscale=float(scaling.get("mscale") or 0),
        mscale_all_dim=float(scaling.get("mscale_all_dim") or 0),
        interleave=interleave,
    )


def _deepseek(hf: Mapping[str, Any]) -> ModelConfig:
    a = DEEPSEEK_V3
    n_layers = int(_need(hf, "num_hidden_layers", a))
    first_dense = int(hf.get("first_k_dense_replace", 0))
    freq = int(hf.get("moe_layer_freq", 1))
    if freq < 1:
        raise ValueError(f"moe_layer_freq must be >= 1, got {freq}")
    experts = int(_need(hf, "n_routed_experts", a))
    kinds = tuple(
        MOE if experts > 0 and i >= first_dense and i % freq == 0 else DENSE for i in range(n_layers)
    )
    n_group = int(hf.get("n_group") or 1)
    topk_group = int(hf.get("topk_group") or 1)
    if n_group < 1 or experts % n_group or not 1 <= topk_group <= n_group:
        raise ValueError(
            f"n_group={n_group} must divide n_routed_experts={experts} and "
            f"1 <= topk_group={topk_group} <= n_group"
        )
    scoring = hf.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise ValueError(f"DeepSeek-V3 scoring_func {scoring!r} is not supported (sigmoid)")
    heads = int(_need(hf, "num_attention_heads", a))
    q_lora = hf.get("q_lora_rank")
    return ModelConfig(
        architecture=a,
        vocab_size=int(_need(hf, "vocab_size", a)),
        hidden_size=int(_need(hf, "hidden_size", a)),
        intermediate_size=int(_need(hf, "intermediate_size", a)),
        moe_intermediate_size=int(_need(hf, "moe_intermediate_size", a)),
        num_layers=n_layers,
        num_attention_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(_need(hf, "qk_rope_head_dim", a)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        num_experts=experts,
        top_k=int(_need(hf, "num_experts_per_tok", a)),
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        layer_kinds=kinds,
        rope=_rope(hf, a, interleave=bool(hf.get("rope_interleave", True))),
        max_position_embeddings=int(_need(hf, "max_position_embeddings", a)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        q_lora_rank=None if q_lora is None else int(q_lora),
        kv_lora_rank=int(_need(hf, "kv_lora_rank", a)),
        qk_nope_head_dim=int(_need(hf, "qk_nope_head_dim", a)),
        qk_rope_head_dim=int(_need(hf, "qk_rope_head_dim", a)),
        v_head_dim=int(_need(hf, "v_head_dim", a)),
        n_shared_experts=int(hf.get("n_shared_experts") or 0),
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
    )


def _qwen3(hf: Mapping[str, Any]) -> ModelConfig:
    a = QWEN3_MOE
    n_layers = int(_need(hf, "num_hidden_layers", a))
    experts = int(_need(hf, "num_experts", a))
    step = int(hf.get("decoder_sparse_step", 1))
    if step < 1:
        raise ValueError(f"decoder_sparse_step must be >= 1, got {step}")
    dense_only = {int(i) for i in hf.get("mlp_only_layers") or []}
    kinds = tuple(
        MOE if experts > 0 and i not in dense_only and (i + 1) % step == 0 else DENSE
        for i in range(n_layers)
    )
    hidden = int(_need(hf, "hidden_size", a))
    heads = int(_need(hf, "num_attention_heads", a))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    if heads < 1 or kv_heads < 1:
        raise ValueError(f"config.json of {a}: num_attention_heads={heads} and "
                         f"num_key_value_heads={kv_heads} must be >= 1")
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    if hf.get("use_sliding_window"):
        raise ValueError("Qwen3-MoE with use_sliding_window=true is not supported")
    if DENSE in kinds and not hf.get("intermediate_size"):
        raise KeyError(f"config.json of {a} has dense layers but lacks 'intermediate_size'")
    return ModelConfig(
        architecture=a,
        vocab_size=int(_need(hf, "vocab_size", a)),
        hidden_size=hidden,
        intermediate_size=int(hf.get("intermediate_size") or 0),
        moe_intermediate_size=int(_need(hf, "moe_intermediate_size", a)),
        num_layers=n_layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        num_experts=experts,
        top_k=int(_need(hf, "num_experts_per_tok", a)),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        layer_kinds=kinds,
        rope=_rope(hf, a, interleave=False),
        max_position_embeddings=int(_need(hf, "max_position_embeddings", a)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
    )


def _check_ranges(c: ModelConfig) -> None:
    """Reject sizes the decoders cannot build, naming the config.json key and its range."""
    positive = {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
                "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": c.num_kv_heads, "max_position_embeddings":
                c.max_position_embeddings}
    if c.is_deepseek:
        positive.update(kv_lora_rank=c.kv_lora_rank, qk_rope_head_dim=c.qk_rope_head_dim,
                        v_head_dim=c.v_head_dim)
        if c.q_lora_rank is not None:
            positive["q_lora_rank"] = c.q_lora_rank
    else:
        positive["head_dim"] = c.head_dim
    if DENSE in c.layer_kinds:
        positive["intermediate_size"] = c.intermediate_size
    if c.moe_layer_indices:
        positive["moe_intermediate_size"] = c.moe_intermediate_size
    bad = [f"{k}={v}" for k, v in positive.items() if v < 1]
    if bad:
        raise ValueError(f"config.json of {c.architecture}: {', '.join(bad)}; must be >= 1")
    if c.is_deepseek and c.qk_nope_head_dim < 0:
        raise ValueError(f"config.json of {c.architecture}: qk_nope_head_dim="
                         f"{c.qk_nope_head_dim}; must be >= 0")
    if not c.rms_norm_eps > 0:
        raise ValueError(f"config.json of {c.architecture}: rms_norm_eps={c.rms_norm_eps}; "
                         f"must be > 0")
    if c.is_deepseek and c.moe_layer_indices and c.num_experts // c.n_group < 2:
        raise ValueError(f"config.json of {c.architecture}: n_routed_experts / n_group = "
                         f"{c.num_experts} / {c.n_group} < 2; a group scores its top-2 experts")
    if c.moe_layer_indices:
        # group-limited routing picks top_k among the experts of topk_group groups
        reachable = c.topk_group * (c.num_experts // c.n_group) if c.is_deepseek else c.num_experts
        if not 1 <= c.top_k <= reachable:
            where = (f"topk_group * n_routed_experts / n_group = {reachable}" if c.is_deepseek
                     else f"num_experts = {c.num_experts}")
            raise ValueError(f"config.json of {c.architecture}: num_experts_per_tok={c.top_k} "
                             f"must be in [1, {where}]")
