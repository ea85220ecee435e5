"""Our manager's per-layer view in the shape TensorRT-LLM's CuteDSL NVFP4 kernel takes (pure).

``DwdpManager.weights(i)`` returns ``{our name: [S tensors by rank]}``. TensorRT-LLM's
``NvFp4WeightView`` (``fused_moe_cute_dsl.py``) wants six lists under its own field names, with
the local slot holding the backend's own tensors as its quantization method publishes them
(``quant_scales`` fields, which may be views with another shape than the raw parameters).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from tensorrt_llm_dwdp.trtllm.names import WEIGHT_VIEW_FIELDS


def weight_view_fields(
    view: Mapping[str, Sequence[torch.Tensor]],
    local: Mapping[str, torch.Tensor],
    rank: int,
) -> dict[str, list[torch.Tensor]]:
    """``{NvFp4WeightView field: [S tensors]}``: peers' entries from ``view``, entry ``rank``
    replaced by ``local[name]`` where given (our names). Raises ``KeyError`` naming what is
    missing."""
    missing = sorted({ours for ours in WEIGHT_VIEW_FIELDS.values()} - set(view))
    if missing:
        raise KeyError(f"DWDP view lacks {missing}; an NVFP4 layer registers all six tensors")
    out: dict[str, list[torch.Tensor]] = {}
    for field, ours in WEIGHT_VIEW_FIELDS.items():
        tensors = list(view[ours])
        if not 0 <= rank < len(tensors):
            raise IndexError(f"rank {rank} outside the {len(tensors)}-tensor view of {ours!r}")
        if ours in local:
            tensors[rank] = local[ours]
        out[field] = tensors
    return out
