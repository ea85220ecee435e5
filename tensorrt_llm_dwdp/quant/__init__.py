"""Quantized weight formats: NVFP4 (e2m1 values, e4m3 block scales, fp32 global scale)."""
