"""MoE expert backends and their registry.

A backend runs the routed experts of one layer:
``run_experts(x [T, H] bf16, topk_ids [T, k] int32, topk_weights [T, k] fp32, weights:
ExpertWeights) -> [T, H] bf16``, with expert ids global to ``weights`` (``[0,
weights.num_experts)``). Each backend module defines ``create_backend() -> MoeBackend``;
the registry maps a name to that module and imports it only when asked for, so a missing
optional dependency (the CUTLASS DSL) costs nothing until the backend is chosen.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Protocol

import torch

from tensorrt_llm_dwdp.moe.weights import ExpertWeights

BACKEND_MODULES: dict[str, str] = {
    "torch": "tensorrt_llm_dwdp.moe.backends.torch_ref",
    "cutedsl": "tensorrt_llm_dwdp.moe.backends.cutedsl",
    "torch-grouped": "tensorrt_llm_dwdp.moe.backends.torch_grouped",
}


class MoeBackend(Protocol):
    # False for backends that need one [E, ...] tensor per parameter (a composite view).
    accepts_multi_tensor: bool

    def run_experts(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        weights: ExpertWeights,
    ) -> torch.Tensor: ...


def _cutedsl_missing() -> list[str]:
    """What the CuTeDSL backend needs and this machine lacks (empty when all is there)."""
    missing = []
    if importlib.util.find_spec("cutlass") is None:
        missing.append("the CUTLASS DSL (pip install nvidia-cutlass-dsl==4.3.5)")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    else:
        major, minor = torch.cuda.get_device_capability()
        if major < 9:
            missing.append(f"an sm90+ GPU (device 0 is sm{major}{minor})")
    return missing


def get_backend(name: str) -> MoeBackend:
    """The backend registered as ``name`` ('torch', 'cutedsl' or 'torch-grouped'); clear errors
    when it cannot run here."""
    if name not in BACKEND_MODULES:
        raise ValueError(f"unknown MoE backend {name!r}; choose one of {sorted(BACKEND_MODULES)}")
    module_name = BACKEND_MODULES[name]
    if name == "cutedsl":
        missing = _cutedsl_missing()
        if missing:
            raise RuntimeError(f"MoE backend 'cutedsl' needs {'; '.join(missing)}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise RuntimeError(
                f"MoE backend {name!r}: module {module_name} is not present in this install"
            ) from exc
        raise RuntimeError(
            f"MoE backend {name!r}: importing {module_name} failed, missing module {exc.name!r}"
        ) from exc
    return module.create_backend()


def distinct_backends(moes) -> list:
    """The distinct backend objects of ``moes`` (``ConfigurableMoE`` layers), in layer order."""
    out, seen = [], set()
    for moe in moes:
        backend = getattr(moe, "backend", None)
        if backend is not None and id(backend) not in seen:
            seen.add(id(backend))
            out.append(backend)
    return out


def warm_up_backends(moes) -> int:
    """Compile, before any request, every kernel the backends of ``moes`` can pick at run
    time (backends with a ``warm_up(weights, top_k)``: the JIT-compiled ones), once per
    backend object and expert shape, over each layer's own expert weights. Returns how many
    kernels were compiled (0 for backends that compile nothing)."""
    done, compiled = set(), 0
    for moe in moes:
        weights = moe.local_weights
        warm_up = getattr(moe.backend, "warm_up", None)
        if warm_up is None or weights is None:
            continue
        key = (id(moe.backend), weights.hidden_size, weights.intermediate_size, moe.top_k)
        if key not in done:
            done.add(key)
            compiled += warm_up(weights, moe.top_k)
    return compiled


def warm_up_model(model) -> int:
    """``warm_up_backends`` over every MoE layer of ``model`` (0 for a model without any)."""
    moes = getattr(model, "moe_modules", None)
    return warm_up_backends(moes().values()) if moes is not None else 0


def compile_stats(backends) -> tuple[int, float]:
    """(kernels compiled, seconds compiling) summed over ``backends`` (those that compile:
    a ``compile_stats()`` method); (0, 0.0) when none does."""
    count, seconds = 0, 0.0
    for backend in backends:
        stats = getattr(backend, "compile_stats", None)
        if stats is not None:
            n, s = stats()
            count, seconds = count + n, seconds + s
    return count, seconds
