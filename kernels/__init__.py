"""CuTeDSL kernels for the DWDP MoE backends, installed as ``tensorrt_llm_dwdp.kernels``.

Importing this package needs nothing beyond the library; kernel modules import the CUTLASS DSL
(``nvidia-cutlass-dsl==4.3.5``) when first used, with a message naming it when missing.

- ``compile_cache``: one ``cute.compile`` per static configuration, owned by the caller.
- ``testing``: random NVFP4 experts and routings for tests and benches.
- ``sm90/``: Hopper W4A16 MoE GEMMs. ``fc1_swiglu.fc1_gather_swiglu`` (gather + NVFP4 grouped
  GEMM + SwiGLU), ``fc2_finalize.fc2_weighted`` (NVFP4 grouped GEMM writing router-weighted
  fp32 rows) and ``fc2_finalize.finalize`` (slot-order sum), over the multi-B
  ``expert_table.ExpertTable``. Kernels: ``w4a16_grouped_gemm`` (default schedule),
  ``w4a16_grouped_gemm_ws`` (warp-specialized, bitwise equal), ``slot_sum``; PTX helpers in
  ``ptx`` and ``nvfp4_dequant``. Measurements and limits: ``NOTES.md``.
"""
