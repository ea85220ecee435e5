"""Adapter into TensorRT-LLM's PyTorch backend: our DwdpManager (composite view) built where
TensorRT-LLM builds its own ``DwdpManager`` and driven by upstream's DWDP calls (``add_layer``,
``setup(model)``, ``prefetch_first_layers``, ``wait_and_bind``,
``record_compute_and_prefetch_next``, ``__exit__``). ``contract.py`` lists what was read where.

Pure parts (name mapping, config conversion, MoE discovery, the step protocol) need only torch;
everything that touches tensorrt_llm imports it where used. See docs/TRTLLM.md.
"""
from tensorrt_llm_dwdp.trtllm.bridge import TrtllmDwdpBridge
from tensorrt_llm_dwdp.trtllm.config import from_trtllm, to_trtllm, to_trtllm_dict
from tensorrt_llm_dwdp.trtllm.install import (Installation, active_installation,
                                              attach_layer_hooks, install, manager_class)
from tensorrt_llm_dwdp.trtllm.names import (expert_tensors, find_moe_modules, is_moe_module,
                                            rebind_quant_scales)
from tensorrt_llm_dwdp.trtllm.protocol import StepAdapter

__all__ = [
    "Installation", "StepAdapter", "TrtllmDwdpBridge", "active_installation",
    "attach_layer_hooks", "expert_tensors", "find_moe_modules", "from_trtllm", "install",
    "is_moe_module", "manager_class", "rebind_quant_scales", "to_trtllm", "to_trtllm_dict",
]
