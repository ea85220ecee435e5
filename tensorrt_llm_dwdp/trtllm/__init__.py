"""Adapter into TensorRT-LLM's PyTorch backend: our DwdpManager behind upstream's DWDP calls.

Pure parts (name mapping, config conversion, MoE discovery) need only torch; everything that
touches tensorrt_llm imports it where used. See docs/TRTLLM.md.
"""
from tensorrt_llm_dwdp.trtllm.bridge import LayerCollector, TrtllmDwdpBridge
from tensorrt_llm_dwdp.trtllm.config import from_trtllm, to_trtllm, to_trtllm_dict
from tensorrt_llm_dwdp.trtllm.install import Installation, attach, attach_layer_hooks, install
from tensorrt_llm_dwdp.trtllm.names import (expert_tensors, find_moe_modules, is_moe_module,
                                            quant_scale_tensors)
from tensorrt_llm_dwdp.trtllm.view import weight_view_fields

__all__ = [
    "Installation", "LayerCollector", "TrtllmDwdpBridge", "attach", "attach_layer_hooks",
    "expert_tensors", "find_moe_modules", "from_trtllm", "install", "is_moe_module",
    "quant_scale_tensors", "to_trtllm", "to_trtllm_dict", "weight_view_fields",
]
