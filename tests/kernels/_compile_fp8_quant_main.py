"""Compile the FP8 activation-quantization kernel for sm_90a without a GPU (run as a script by
test_fp8_quant_sm90.py with CUTE_DSL_ARCH / CUTE_DSL_KEEP_CUBIN / CUTE_DSL_KEEP_PTX /
CUTE_DSL_DUMP_DIR set). ``cute.compile`` writes the cubin and PTX, then fails to load them (no
driver): that failure is expected and reported as 'loaded=no'; any other error fails.
Usage: python _compile_fp8_quant_main.py (row|col)
"""
import sys

import torch


def main() -> int:
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr

    from tensorrt_llm_dwdp.kernels.sm90.fp8_quant_kernel import Fp8ActQuant

    tokens, k = 4, 256
    x = torch.zeros(tokens, k, dtype=torch.bfloat16)
    q = torch.zeros(tokens, k, dtype=torch.uint8)
    scale = torch.zeros(tokens, k // 128)
    gmem = cute.AddressSpace.gmem
    args = [make_ptr(cutlass.BFloat16, x.data_ptr(), gmem, assumed_align=16),
            make_ptr(cutlass.Uint8, q.data_ptr(), gmem, assumed_align=16),
            make_ptr(cutlass.Float32, scale.data_ptr(), gmem, assumed_align=4),
            *[cutlass.Int32(v) for v in (tokens, k // 128, k, 1, 1)], cuda.CUstream(0)]
    try:
        cute.compile(Fp8ActQuant(sys.argv[1]), *args)
        print("loaded=yes")
    except Exception as exc:  # the only acceptable failure is the missing driver at load
        text = f"{type(exc).__name__}: {exc}"
        if "Driver" not in text and "driver" not in text:
            raise
        print("loaded=no")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
