"""Baselines DWDP is measured against: expert parallelism with all-to-all dispatch/combine."""
from tensorrt_llm_dwdp.parallel.dispatch import DispatchPlan, plan_dispatch
from tensorrt_llm_dwdp.parallel.expert_parallel import ExpertParallelBackend, EpCallStats
from tensorrt_llm_dwdp.parallel.spans import SpanTimer

__all__ = ["DispatchPlan", "plan_dispatch", "ExpertParallelBackend", "EpCallStats", "SpanTimer"]
