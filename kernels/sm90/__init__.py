"""Hopper (sm_90a) CuTeDSL kernels: W4A16 grouped GEMMs for MoE (NVFP4 weights dequantized to
bf16 in registers and fed to WGMMA as its register operand, fp32 accumulation)."""
