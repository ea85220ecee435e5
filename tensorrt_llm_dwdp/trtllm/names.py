"""Which TensorRT-LLM modules are MoE layers and which of their tensors DWDP moves (pure).

TensorRT-LLM's fused-MoE backends (``CuteDslFusedMoE`` and the others under
``tensorrt_llm/_torch/modules/fused_moe/``) keep their routed experts as attributes with dim 0
= the rank's local experts: ``w3_w1_weight`` and ``w2_weight``, the NVFP4 block scales
``w3_w1_weight_scale`` / ``w2_weight_scale`` (upstream moves these four through its composite
view), the optional biases ``w3_w1_bias`` / ``w2_bias``, and small per-expert parameters that
upstream finds by name: any parameter whose name holds ``scale``, ``scaling_factor``,
``dequant`` or ``alpha`` and whose dim 0 is the local expert count (``fc31_alpha``,
``fc2_alpha``, ...; upstream allgathers these, we move them through the composite view like the
rest). The quantization method also publishes the scales in a ``quant_scales`` record whose
fields carry other names (``fc1_weight_block``, ``fc1_global``, ``fc2_weight_block``,
``fc2_global``); the NVFP4 kernels read the scales from that record, so ``rebind_quant_scales``
keeps it on the live parameters. ``ConfigurableMoE`` wraps one backend in ``.backend``.
Nothing here imports tensorrt_llm.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

#: Required expert weights, then the block scales upstream transports with them.
WEIGHT_NAMES = ("w3_w1_weight", "w2_weight")
TRANSPORTED_NAMES = WEIGHT_NAMES + ("w3_w1_weight_scale", "w2_weight_scale")
BIAS_NAMES = ("w3_w1_bias", "w2_bias")
#: A parameter whose name holds one of these and whose dim 0 is the local expert count is
#: per-expert (upstream's ``_allgather_expert_scales`` rule).
PER_EXPERT_MARKS = ("scale", "scaling_factor", "dequant", "alpha")
REQUIRED = WEIGHT_NAMES

# ``quant_scales`` record field (FusedMoEQuantScalesNVFP4) -> backend attribute.
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


def _attr(owner: nn.Module, name: str) -> torch.Tensor | None:
    value = owner._parameters.get(name, owner._buffers.get(name, owner.__dict__.get(name)))
    return _tensor(value)


def expert_backend(module: nn.Module) -> nn.Module:
    """The module that owns the expert tensors: ``module.backend`` for a ConfigurableMoE-style
    wrapper, the module itself otherwise."""
    inner = module._modules.get("backend")
    return inner if isinstance(inner, nn.Module) else module


def is_moe_module(module: nn.Module) -> bool:
    """True when ``module`` (or its ``backend``) holds routed experts under TensorRT-LLM names."""
    owner = expert_backend(module)
    return all(_attr(owner, n) is not None for n in REQUIRED)


def _tensor_names(owner: nn.Module) -> list[str]:
    names = list(owner._parameters) + list(owner._buffers)
    names += [k for k, v in owner.__dict__.items() if isinstance(v, torch.Tensor)]
    return list(dict.fromkeys(names))


def is_per_expert_name(name: str) -> bool:
    """Upstream's name rule for small per-expert parameters."""
    return any(mark in name for mark in PER_EXPERT_MARKS)


def expert_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Attribute name -> tensor of every per-expert tensor the module holds (dim 0 = the local
    expert count ``n``, taken from ``w3_w1_weight``).

    The weights, their block scales and the biases must have ``n`` as dim 0 (DWDP copies
    expert ranges as byte ranges of dim 0): a ``ValueError`` names the attribute that does not.
    Other tensors are per-expert when their name passes :func:`is_per_expert_name` and their
    dim 0 is ``n``; the rest (input scales, shared constants) stay where they are.
    """
    owner = expert_backend(module)
    missing = [name for name in REQUIRED if _attr(owner, name) is None]
    if missing:
        raise ValueError(f"{type(owner).__name__} has no expert tensor(s) {missing}")
    n = _attr(owner, "w3_w1_weight").shape[0]
    out: dict[str, torch.Tensor] = {}
    for name in TRANSPORTED_NAMES + BIAS_NAMES:
        t = _attr(owner, name)
        if t is None:
            continue
        if t.dim() == 0 or t.shape[0] != n:
            raise ValueError(
                f"{type(owner).__name__}.{name} has shape {tuple(t.shape)}; "
                f"DWDP needs the local expert count {n} as its first dim"
            )
        out[name] = t
    for name in _tensor_names(owner):
        if name in out or not is_per_expert_name(name):
            continue
        t = _attr(owner, name)
        if t is not None and t.dim() > 0 and t.shape[0] == n:
            out[name] = t
    return out


def bind_tensor(backend: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Point ``backend.<name>`` at ``tensor``: a parameter keeps its object (``param.data``, as
    upstream binds), a buffer or plain attribute is replaced."""
    param = backend._parameters.get(name)
    if param is not None:
        param.data = tensor
    elif name in backend._buffers:
        backend._buffers[name] = tensor
    else:
        setattr(backend, name, tensor)


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
    for field, attr in QUANT_SCALES_TO_OURS.items():
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
