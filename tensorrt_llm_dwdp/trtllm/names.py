"""Which TensorRT-LLM modules are MoE layers and which of their tensors DWDP moves (pure).

TensorRT-LLM's fused-MoE backends (``CuteDslFusedMoE`` and the others under
``tensorrt_llm/_torch/moe/fused_moe/``) keep their routed experts as attributes whose names
our manager already uses (``docs/ARCHITECTURE.md``): ``w3_w1_weight``, ``w2_weight``, the NVFP4
block scales ``w3_w1_weight_scale`` / ``w2_weight_scale``, the global scales ``fc31_alpha`` /
``fc2_alpha`` and the optional biases ``w3_w1_bias`` / ``w2_bias``. The quantization method also
publishes the scales in a ``quant_scales`` record whose fields carry other names
(``fc1_weight_block``, ``fc1_global``, ``fc2_weight_block``, ``fc2_global``); the NVFP4 kernels
read the scales from that record, so ``rebind_quant_scales`` keeps it on the live parameters.
``ConfigurableMoE`` wraps one backend in ``.backend``. Nothing here imports tensorrt_llm.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

# TensorRT-LLM module attribute -> our parameter name (identical by design).
TRTLLM_TO_OURS: dict[str, str] = {
    "w3_w1_weight": "w3_w1_weight",
    "w2_weight": "w2_weight",
    "w3_w1_weight_scale": "w3_w1_weight_scale",
    "w2_weight_scale": "w2_weight_scale",
    "fc31_alpha": "fc31_alpha",
    "fc2_alpha": "fc2_alpha",
    "w3_w1_bias": "w3_w1_bias",
    "w2_bias": "w2_bias",
}
OURS_TO_TRTLLM: dict[str, str] = {v: k for k, v in TRTLLM_TO_OURS.items()}
REQUIRED = ("w3_w1_weight", "w2_weight")

# ``quant_scales`` record field (FusedMoEQuantScalesNVFP4) -> our parameter name.
QUANT_SCALES_TO_OURS: dict[str, str] = {
    "fc1_weight_block": "w3_w1_weight_scale",
    "fc1_global": "fc31_alpha",
    "fc2_weight_block": "w2_weight_scale",
    "fc2_global": "fc2_alpha",
}


def _tensor(value: object) -> torch.Tensor | None:
    if isinstance(value, nn.Parameter):
        return value.data
    return value if isinstance(value, torch.Tensor) else None


def expert_backend(module: nn.Module) -> nn.Module:
    """The module that owns the expert tensors: ``module.backend`` for a ConfigurableMoE-style
    wrapper, the module itself otherwise."""
    inner = module._modules.get("backend")
    return inner if isinstance(inner, nn.Module) else module


def is_moe_module(module: nn.Module) -> bool:
    """True when ``module`` (or its ``backend``) holds routed experts under TensorRT-LLM names."""
    owner = expert_backend(module)
    return all(_tensor(owner.__dict__.get(n, owner._parameters.get(n))) is not None for n in REQUIRED)


def expert_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Our-name -> tensor for every expert tensor the module holds (dim 0 = local experts).

    Raises ``ValueError`` naming the attribute when a tensor's first dim disagrees with
    ``w3_w1_weight``'s (DWDP copies expert ranges as byte ranges of dim 0).
    """
    owner = expert_backend(module)
    out: dict[str, torch.Tensor] = {}
    for attr, ours in TRTLLM_TO_OURS.items():
        t = _tensor(owner.__dict__.get(attr, owner._parameters.get(attr)))
        if t is not None:
            out[ours] = t
    missing = [n for n in REQUIRED if n not in out]
    if missing:
        raise ValueError(f"{type(owner).__name__} has no expert tensor(s) {missing}")
    n = out["w3_w1_weight"].shape[0]
    for name, t in out.items():
        if t.dim() == 0 or t.shape[0] != n:
            raise ValueError(
                f"{type(owner).__name__}.{OURS_TO_TRTLLM[name]} has shape {tuple(t.shape)}; "
                f"DWDP needs the local expert count {n} as its first dim"
            )
    return out


def rebind_quant_scales(module: nn.Module) -> None:
    """Point the module's ``quant_scales`` record at its live scale/alpha attributes.

    TensorRT-LLM's NVFP4 kernels read the scales from that record; once the parameters'
    ``.data`` move (to shared memory at setup, to a composite tensor at every bind), the record
    must hold the parameter objects themselves, as upstream's ``_rebuild_quant_scales`` does.
    A module without such a record is left alone.
    """
    owner = expert_backend(module)
    record = owner.__dict__.get("quant_scales")
    if record is None or not hasattr(record, "_replace"):
        return
    updates = {}
    for field, ours in QUANT_SCALES_TO_OURS.items():
        attr = OURS_TO_TRTLLM[ours]
        value = owner._parameters.get(attr, owner.__dict__.get(attr))
        if field in record._fields and value is not None:
            updates[field] = value
    owner.quant_scales = record._replace(**updates)


def moe_layer_index(module: nn.Module, fallback: int) -> int:
    """The module's ``layer_idx`` attribute when it is an int, else ``fallback``."""
    idx = module.__dict__.get("layer_idx")
    return idx if isinstance(idx, int) and not isinstance(idx, bool) else fallback


def find_moe_modules(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """``(layer_idx, qualified name, module)`` of every outermost MoE module, in model order.

    A wrapper and its ``backend`` count once (the wrapper). Modules without an integer
    ``layer_idx`` are numbered by their order among the MoE modules found.
    """
    found: list[tuple[int, str, nn.Module]] = []
    taken: set[int] = set()
    for name, mod in _walk(model):
        if id(mod) in taken or not is_moe_module(mod):
            continue
        taken.add(id(mod))
        taken.add(id(expert_backend(mod)))
        found.append((moe_layer_index(mod, len(found)), name, mod))
    seen: dict[int, str] = {}
    for idx, name, _ in found:
        if idx in seen:
            raise ValueError(f"MoE modules {seen[idx]!r} and {name!r} share layer_idx {idx}")
        seen[idx] = name
    return found


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    return iter(model.named_modules())
