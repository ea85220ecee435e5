"""Quantized weight formats: NVFP4 (e2m1 values, e4m3 block scales, fp32 global scale) and FP8
block-128 (e4m3 weights with one fp32 scale per 128x128 block, activations per token per 128)."""
