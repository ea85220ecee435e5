"""Compile the sm90 grouped GEMMs for sm_90a without a GPU (run as a script by
test_compile_sm90.py with CUTE_DSL_ARCH / CUTE_DSL_KEEP_CUBIN / CUTE_DSL_DUMP_DIR set).

``cute.compile`` writes the cubin, then fails to load it (no driver): that failure is expected
and reported as 'loaded=no'; any other error fails the script.
Usage: python _compile_sm90_main.py (swiglu|weighted) TILE_M N_SUB [ws|plain|fused [STAGES]] | slot_sum 0 0
"""
import sys

import torch


def main() -> int:
    from tensorrt_llm_dwdp.kernels.sm90.w4a16_grouped_gemm import W4A16GroupedGemm

    epilogue, tile_m, n_sub = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    hidden, inter, experts = 2048, 768, 8  # Qwen3-30B-A3B dims, few experts
    if epilogue == "slot_sum":
        from tensorrt_llm_dwdp.kernels.sm90.slot_sum import SlotSum

        return _compile(SlotSum(hidden, 8), [torch.zeros(64, hidden), torch.zeros(4, 8, dtype=torch.int32),
                                             torch.zeros(4, hidden, dtype=torch.bfloat16)], [4])
    rows = 2 * tile_m
    if epilogue == "swiglu":
        k, n_weight, gather = hidden, 2 * inter, True
        a = torch.zeros(16, hidden, dtype=torch.bfloat16)
        out = torch.zeros(rows, inter, dtype=torch.bfloat16)
    else:
        k, n_weight, gather = inter, hidden, False
        a = torch.zeros(rows, inter, dtype=torch.bfloat16)
        out = torch.zeros(rows, hidden, dtype=torch.float32)
    args = [a, torch.zeros(rows, dtype=torch.int32), torch.zeros(2, dtype=torch.int32),
            torch.zeros(experts, dtype=torch.int32), torch.zeros(experts, dtype=torch.int32),
            torch.zeros(3, 2, dtype=torch.int64), torch.zeros(rows, dtype=torch.float32), out]
    cls, extra = W4A16GroupedGemm, {}
    if len(sys.argv) > 4 and sys.argv[4] == "fused":
        extra = {"fuse_n": True}
    if len(sys.argv) > 4 and sys.argv[4] == "ws":
        from tensorrt_llm_dwdp.kernels.sm90.w4a16_grouped_gemm_ws import W4A16GroupedGemmWS as cls
    stages = int(sys.argv[5]) if len(sys.argv) > 5 else 4
    kernel = cls(epilogue=epilogue, n_weight=n_weight, k=k, tile_m=tile_m, n_sub=n_sub,
                 gather=gather, stages=stages, **extra)
    return _compile(kernel, args, [a.shape[0], 2, experts, 2])


def _compile(kernel, tensors, sizes) -> int:
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute

    from tensorrt_llm_dwdp.kernels.sm90.grouped_launch import gmem_ptr

    ptrs = [gmem_ptr(t, 16 if t.dim() == 2 and t.dtype != torch.int32 else None) for t in tensors]
    try:
        cute.compile(kernel, *ptrs, *[cutlass.Int32(v) for v in sizes], cuda.CUstream(0))
        print("loaded=yes")
    except Exception as exc:  # the only acceptable failure is the missing driver at load
        text = f"{type(exc).__name__}: {exc}"
        if "Driver" not in text and "driver" not in text:
            raise
        print("loaded=no")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
