"""Attention-DP + expert-parallel MoE: the layout TensorRT-LLM (DEP), SGLang and vLLM (DP+EP)
use for DeepSeek today, and the baseline DWDP is measured against.

Each of S ranks holds E/S experts (rank s: ``[s*E/S, (s+1)*E/S)``) and routes its own tokens.
Per MoE layer (``ExpertParallel.run_experts``):

1. plan: every token goes once to each rank owning one of its experts, with its k ids made
   local to that rank (-1 where the slot's expert is elsewhere) and its k router weights
   (``parallel/dispatch.py``; one host read: the row counts);
2. dispatch: rows, ids and weights go to their owners (``RowExchange.all_to_all``; the counts
   step is NCCL's only host round trip, the shared-memory exchange's only host step);
3. compute: the received rows run through the MoE backend as a ``[R, k]`` routing with empty
   slots: the grouped GEMM gathers each received row once per local (row, expert) pair, the
   finalize applies the router weights and sums each row's slots in fp32 (one bf16 rounding);
4. combine: each received row's bf16 partial sum goes back to its source, which adds its
   ranks' partials in rank order in fp32 and rounds once to bf16.

Tolerance (documented, tested): the result equals the replicated model's MoE output up to the
bf16 rounding of the per-rank partial sums, ``max |EP - ref| <= 1e-2 * max |ref|`` for the
layer; logits of a whole model within 3e-2 of the replicated model's, relative to their
maximum. Every rank of the group calls ``run_experts`` once per MoE layer, in layer order, even
with no tokens (an idle rank still computes the rows its peers send to its experts).
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from tensorrt_llm_dwdp.parallel.dispatch import experts_per_rank, plan_dispatch
from tensorrt_llm_dwdp.parallel.exchange import RowExchange
from tensorrt_llm_dwdp.parallel.spans import SpanTimer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpCallStats:
    """Rows one rank sent and received in its last call."""

    rows_sent: int
    rows_received: int


class ExpertParallel:
    """One rank's side of the expert-parallel MoE; owns ``exchange`` (closed by ``close``)."""

    def __init__(self, exchange: RowExchange, num_experts: int, *,
                 timer: SpanTimer | None = None) -> None:
        self.exchange = exchange
        self.rank, self.size = exchange.rank, exchange.size
        self.num_experts = num_experts
        self.experts_per_rank = experts_per_rank(num_experts, self.size)
        self.timer = timer
        self.calls = 0
        self.last_stats: EpCallStats | None = None

    @property
    def local_range(self) -> tuple[int, int]:
        """Global experts ``[first, end)`` this rank holds."""
        first = self.rank * self.experts_per_rank
        return first, first + self.experts_per_rank

    def _span(self, name: str):
        return self.timer.span(name) if self.timer is not None else nullcontext()

    def run_experts(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    local: Any, backend: Any) -> torch.Tensor:
        """``x [T,H]`` bf16, ``topk_ids [T,k]`` GLOBAL ids, ``topk_weights [T,k]`` fp32 ->
        ``[T,H]`` bf16. ``local``: this rank's ``ExpertWeights`` (E/S experts); ``backend`` a
        MoE backend (``moe/backends``) that takes empty (-1) slots."""
        if x.dim() != 2 or topk_ids.shape[0] != x.shape[0] or topk_ids.shape != topk_weights.shape:
            raise ValueError(
                f"run_experts: x {tuple(x.shape)}, topk_ids {tuple(topk_ids.shape)} and "
                f"topk_weights {tuple(topk_weights.shape)} disagree (want [T,H], [T,k], [T,k])"
            )
        if local.num_experts != self.experts_per_rank:
            raise ValueError(f"rank {self.rank} holds {local.num_experts} experts, expert "
                             f"parallelism over {self.size} ranks needs {self.experts_per_rank}")
        self.calls += 1
        t, h = x.shape
        plan = plan_dispatch(topk_ids, topk_weights, self.num_experts, self.size)
        (x_recv, ids_recv, w_recv), recv_counts = self.exchange.all_to_all(
            [x[plan.row_token], plan.row_ids, plan.row_weights], plan.counts,
            name="ep_dispatch", span=self._span)
        if x_recv.shape[0]:
            y_recv = backend.run_experts(x_recv, ids_recv, w_recv, local)
        else:
            y_recv = x_recv.new_empty((0, h))
        (y_back,), _ = self.exchange.all_to_all([y_recv], recv_counts, plan.counts,
                                                name="ep_combine", span=self._span)
        out = torch.zeros(t, h, dtype=torch.float32, device=x.device)
        start = 0
        for n in plan.counts:   # a token's partials added in rank order: deterministic
            if n:
                rows = slice(start, start + n)
                out.index_add_(0, plan.row_token[rows], y_back[rows].float())
            start += n
        self.last_stats = EpCallStats(rows_sent=plan.num_rows, rows_received=sum(recv_counts))
        return out.to(x.dtype)

    def close(self) -> None:
        self.exchange.close()
