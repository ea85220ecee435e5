"""Stand-in for TensorRT-LLM (tests only): upstream's module paths, names and DWDP call order as
read in tensorrt_llm_dwdp/trtllm/contract.py, on CPU torch. Written by this project."""
FAKE = True
