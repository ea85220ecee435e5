"""Published and measured figures the planner uses or is checked against, with their sources.

``COPY_H200`` holds the copy-model constants, measured by ``bench/prefetch_bandwidth.py`` on
2xH200 (``bench/results/prefetch_bandwidth_h200x2.json``), not fitted to any validation point:
the efficiency is the raw peer ``cudaMemcpyAsync`` rate over H200's nominal 450 GB/s per
direction, the interference the slowdown of a matmul loop while a layer's prefetch runs.
``BLOG19`` holds TensorRT-LLM tech blog 19's DeepSeek-R1 NVFP4 GB200 figures.
"""
from __future__ import annotations

from tensorrt_llm_dwdp.plan.copy_model import CopyParams

PREFETCH_JSON = "bench/results/prefetch_bandwidth_h200x2.json"
H200_NVLINK_NOMINAL_GBPS = 450.0
# raw_peer_memcpy_gbps of both ranks, and contention_opt_off per rank
# (compute_ms_per_layer, overlap_layer_ms), as recorded in PREFETCH_JSON
H200_RAW_PEER_GBPS = (374.05050444154296, 374.8003436627109)
H200_COMPUTE_VS_OVERLAP_MS = ((12.621295928955078, 13.444557189941406),
                              (12.394060516357422, 13.28821258544922))

COPY_H200 = CopyParams(
    efficiency=sum(H200_RAW_PEER_GBPS) / len(H200_RAW_PEER_GBPS) / H200_NVLINK_NOMINAL_GBPS,
    interference=sum(o / c - 1 for c, o in H200_COMPUTE_VS_OVERLAP_MS) / len(H200_COMPUTE_VS_OVERLAP_MS),
    source=f"{PREFETCH_JSON}: raw peer memcpy / 450 GB/s nominal; matmul slowdown under prefetch",
)

BLOG19_URL = ("https://github.com/NVIDIA/TensorRT-LLM/blob/main/docs/source/blogs/tech_blog/"
              "blog19_DWDP_Distributed_Weight_Data_Parallelism_for_High_Performance_LLM_Inference_on_NVL72.md")
BLOG19 = {
    "source": f"TensorRT-LLM tech blog 19 (DWDP on NVL72), {BLOG19_URL}",
    "setup": "DeepSeek-R1-0528 NVFP4, GB200, context only, ISL 8K, ratio 0.8, max_num_tokens "
             "32768, DWDP4 with 64 prefetched experts per peer (examples/dwdp/dwdp_reproduce.yaml)",
    # Table 3: context-only iteration breakdown, figures as printed (labelled us)
    "iteration": {
        "DEP4": {"attention": 269.67, "grouped_gemm": 342.40, "dense_gemm": 177.50,
                 "others": 241.69, "communication": 126.74, "p2p_copy": 0.0,
                 "synchronization": 161.85, "iteration": 1319.85},
        "DWDP4": {"attention": 320.56, "grouped_gemm": 337.42, "dense_gemm": 189.28,
                  "others": 284.32, "communication": 0.0, "p2p_copy": 429.00,
                  "synchronization": 0.0, "iteration": 1131.58},
    },
    # Table 1: batch-1 roofline-style estimate, ISL -> (T_compute / T_prefetch, T_DEP / T_DWDP)
    "batch1": {1024: (0.19, 0.10), 8192: (0.62, 0.73), 16384: (1.52, 1.27), 32768: (4.77, 1.17)},
    # "Mitigating Asynchronous Communication Contention": contention_opt's TPS/GPU gain over DWDP
    # without it, context only, DWDP4
    "contention_opt_gain": {"isl": 8192, "ratio": 0.5, "max_num_tokens": 16384, "gain": 0.08},
    # Table 4: end-to-end TPS/GPU speed-up by TPS/user range
    "e2e_tps_per_gpu_speedup": {"20-30": 1.10, "40-50": 1.08, "60-70": 1.10, "80-90": 1.06,
                                "170-180": 0.97},
}
