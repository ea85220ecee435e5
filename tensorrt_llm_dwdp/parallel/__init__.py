"""Attention-DP + expert-parallel MoE (the EP serving mode and the baseline DWDP is measured
against): dispatch plan, row exchanges (torch.distributed, or peer-mapped buffers for ranks
sharing a GPU), the per-layer ExpertParallel, group formation and lockstep stepping."""
from tensorrt_llm_dwdp.parallel.config import EpConfig, EpConfigError
from tensorrt_llm_dwdp.parallel.dispatch import MASKED, DispatchPlan, plan_dispatch
from tensorrt_llm_dwdp.parallel.exchange import DistExchange, RowExchange
from tensorrt_llm_dwdp.parallel.expert_parallel import EpCallStats, ExpertParallel
from tensorrt_llm_dwdp.parallel.spans import SpanTimer

__all__ = ["EpConfig", "EpConfigError", "MASKED", "DispatchPlan", "plan_dispatch", "DistExchange",
           "RowExchange", "EpCallStats", "ExpertParallel", "SpanTimer"]
