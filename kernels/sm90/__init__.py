"""Hopper (sm_90a) CuTeDSL kernels: W4A16 grouped GEMMs for MoE (NVFP4 weights dequantized to
bf16 in shared memory, WGMMA with fp32 accumulation)."""
