"""CuTeDSL kernels for the DWDP MoE backends, installed as ``tensorrt_llm_dwdp.kernels``.

Importing this package needs nothing beyond the library; each kernel module imports the
CUTLASS DSL (``nvidia-cutlass-dsl==4.3.5``) itself, with a message naming it when missing.
"""
