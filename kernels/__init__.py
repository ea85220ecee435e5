"""CuTeDSL kernels for the DWDP MoE backends, installed as ``tensorrt_llm_dwdp.kernels``.

Importing this package needs nothing beyond the library; kernel modules import the CUTLASS DSL
(``nvidia-cutlass-dsl==4.3.5``) when first used, with a message naming it when missing.

- ``compile_cache``: one ``cute.compile`` per static configuration, owned by the caller.
- ``testing``: random NVFP4 experts and routings for tests and benches.
- ``sm90/``: Hopper W4A16 MoE GEMMs. ``fc1_swiglu.fc1_gather_swiglu`` (gather + NVFP4 grouped
  GEMM + SwiGLU) and ``fc2_finalize.fc2_finalize`` (NVFP4 grouped GEMM per hidden-column chunk
  writing router-weighted fp32 rows, then ``slot_sum``'s fixed-order sum into bf16), over the
  multi-B ``expert_table.ExpertTable``. One kernel, ``w4a16_rs_gemm`` (weights dequantized in
  registers and fed to WGMMA as its register operand); PTX helpers in ``ptx`` and
  ``nvfp4_dequant``; ``preshuffle`` is the load-time weight layout the kernel reads (the only
  one). Measurements and limits: ``NOTES.md``.
"""
