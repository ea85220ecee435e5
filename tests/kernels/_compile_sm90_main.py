"""Compile the sm90 kernels for sm_90a without a GPU (run as a script by test_compile_sm90.py
with CUTE_DSL_ARCH / CUTE_DSL_KEEP_CUBIN / CUTE_DSL_DUMP_DIR set).

``cute.compile`` writes the cubin, then fails to load it (no driver): that failure is expected
and reported as 'loaded=no'; any other error fails the script.
Usage: python _compile_sm90_main.py (swiglu|scatter) N_WEIGHT K BN [Y_COLS [FIELD=VALUE ...]]
       | slot_sum (fp32|bf16) 0 0   (FIELD=VALUE: ``RsConfig`` overrides, e.g. k_tile=128 ring=4, and
       compute=e4m3 for the W4A8 kernel)
"""
import sys

import torch


def main() -> int:
    kind = sys.argv[1]
    experts = 8
    if kind == "slot_sum":
        from tensorrt_llm_dwdp.kernels.sm90.slot_sum import SlotSum

        y_bf16 = sys.argv[2] == "bf16"  # the scratch dtype (anything else: fp32)
        y = torch.zeros(32, 512, dtype=torch.bfloat16 if y_bf16 else torch.float32)
        return _compile(SlotSum(512, 8, 4096, y_bf16), [y,
                                                torch.zeros(4, 8, dtype=torch.int32),
                                                torch.zeros(4, 4096, dtype=torch.bfloat16)],
                        [4, 0, 512])
    from tensorrt_llm_dwdp.kernels.sm90.grouped_launch import scratch_dtype
    from tensorrt_llm_dwdp.kernels.sm90.w4a16_rs_gemm import W4A16RsGemm, rs_config

    n_weight, k, bn = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    y_cols = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    overrides = {f: int(v) if v.lstrip("-").isdigit() else v
                 for f, v in (a.split("=") for a in sys.argv[6:])}
    compute = overrides.pop("compute", "bf16")
    if "y_bf16" in overrides:
        overrides["y_bf16"] = bool(overrides["y_bf16"])
    config = rs_config(bn, k, compute, **overrides)
    a_dtype = torch.float8_e4m3fn if compute == "e4m3" else torch.bfloat16
    rows = 2 * bn
    out = (torch.zeros(rows, n_weight // 2, dtype=torch.bfloat16) if kind == "swiglu"
           else torch.zeros(rows, y_cols, dtype=scratch_dtype(config)))
    args = [torch.zeros(rows, k, dtype=a_dtype), torch.zeros(rows, k // 128 or 1),
            torch.zeros(rows, dtype=torch.int32),
            torch.zeros(2, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
            torch.zeros(experts, dtype=torch.int32),
            torch.zeros(experts, dtype=torch.int32), torch.zeros(3, 2, dtype=torch.int64),
            torch.zeros(rows, dtype=torch.float32), out]
    kernel = W4A16RsGemm(epilogue=kind, n_weight=n_weight, k=k, bn=bn, y_cols=y_cols,
                         config=config, compute=compute)
    blocks = (y_cols or n_weight) // 64
    return _compile(kernel, args, [2, experts, 2, 0, blocks, 132])


def _compile(kernel, tensors, sizes) -> int:
    from tensorrt_llm_dwdp.kernels.sm90.grouped_launch import gmem_ptr

    ptrs = [gmem_ptr(t, 16 if t.dim() == 2 and t.dtype != torch.int32 else None) for t in tensors]
    return _compile_ptrs(kernel, ptrs, sizes)


def _compile_ptrs(kernel, ptrs, sizes, extra=()) -> int:
    """``cute.compile(kernel, *ptrs, *sizes, *extra, stream)``; a missing driver at load is
    expected."""
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute
    from cutlass.base_dsl.runtime import cuda as cuda_helpers

    # min_blocks_per_mp > 1 asks the device for its shared memory per SM (to set the carveout)
    # while building the launch: answer for sm_90 (228 KiB) since there is no driver here.
    cuda_helpers.get_device_attribute = lambda attr, *args: 228 * 1024
    try:
        cute.compile(kernel, *ptrs, *[cutlass.Int32(v) for v in sizes], *extra,
                     cuda.CUstream(0))
        print("loaded=yes")
    except Exception as exc:  # the only acceptable failure is the missing driver at load
        text = f"{type(exc).__name__}: {exc}"
        if "Driver" not in text and "driver" not in text:
            raise
        print("loaded=no")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
