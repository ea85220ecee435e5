"""Compile the sm90 FP8 grouped GEMM for sm_90a without a GPU (run as a script by
test_compile_fp8.py with CUTE_DSL_ARCH / CUTE_DSL_KEEP_CUBIN / CUTE_DSL_DUMP_DIR set).

``cute.compile`` writes the cubin, then fails to load it (no driver): that failure is expected
and reported as 'loaded=no'; any other error fails the script.
Usage: python _compile_fp8_main.py (swiglu|scatter) N_WEIGHT K BN [Y_COLS [FIELD=VALUE ...]]
       (FIELD=VALUE: ``Fp8Config`` overrides, e.g. ctas_per_sm=1 producer_regs=56)
"""
import dataclasses
import sys

import torch

from _compile_sm90_main import _compile_ptrs


def main() -> int:
    from tensorrt_llm_dwdp.kernels.sm90.fp8_gemm import Fp8BlockGemm, Fp8Config, fp8_config
    from tensorrt_llm_dwdp.kernels.sm90.fp8_launch import fp8_ptr
    from tensorrt_llm_dwdp.kernels.sm90.grouped_launch import scratch_dtype

    kind = sys.argv[1]
    n_weight, k, bn = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    y_cols = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    overrides = {f: int(v) for f, v in (a.split("=") for a in sys.argv[6:])}
    flags = {f.name for f in dataclasses.fields(Fp8Config) if f.type in (bool, "bool")}
    for flag in flags & overrides.keys():
        overrides[flag] = bool(overrides[flag])
    num_tensors = overrides.pop("num_tensors", 1)
    experts, rows = 8, 2 * bn
    config = fp8_config(bn, **overrides)
    out = (torch.zeros(rows, n_weight // 2, dtype=torch.bfloat16) if kind == "swiglu"
           else torch.zeros(rows, y_cols, dtype=scratch_dtype(config)))
    tensors = [torch.zeros(rows, k, dtype=torch.float8_e4m3fn),
               torch.zeros(rows, k // 128, dtype=torch.float32),
               torch.zeros(rows, dtype=torch.int32), torch.zeros(2, dtype=torch.int32),
               torch.zeros(experts, dtype=torch.int32), torch.zeros(experts, dtype=torch.int32),
               torch.zeros(2, 2, dtype=torch.int64), torch.zeros(rows, dtype=torch.float32), out]
    kernel = Fp8BlockGemm(epilogue=kind, n_weight=n_weight, k=k, bn=bn, y_cols=y_cols,
                          config=config, num_tensors=num_tensors)
    blocks = (y_cols or n_weight) // 64
    ptrs = [fp8_ptr(t, 16 if t.dim() == 2 and t.dtype != torch.int32 else 4) for t in tensors]
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr

    w = tuple(make_ptr(cutlass.Float8E4M3FN, 1 << (24 + t), cute.AddressSpace.gmem,
                       assumed_align=16) for t in range(num_tensors))
    counts = tuple(cutlass.Int32(experts // num_tensors) for _ in range(num_tensors))
    return _compile_ptrs(kernel, ptrs, [2, experts, 2, 0, blocks, 132], (w, counts))


if __name__ == "__main__":
    raise SystemExit(main())
