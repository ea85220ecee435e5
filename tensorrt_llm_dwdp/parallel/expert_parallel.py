"""Attention-DP + expert-parallel MoE: the layout TensorRT-LLM, SGLang and vLLM use for
DeepSeek today, and the baseline DWDP is measured against.

Each of S ranks holds E/S experts (rank s: ``[s*E/S, (s+1)*E/S)``) and routes its own tokens.
Per MoE layer:

1. counts: one ``all_to_all_single`` of ``[S, 2]`` (rows, pairs) so receivers can size buffers;
2. dispatch: the token rows (bf16 carried bit-exactly as bytes) and the pair records
   (row, local expert, weight) go to the owner ranks with ``all_to_all_single``;
3. compute: the received pairs run through the SAME backend interface as every other mode,
   ``backend.run_experts(x[P,H], ids[P,1], weights[P,1], local_weights)``, and are summed
   per received row in fp32;
4. combine: the per-row partial sums (bf16) go back with ``all_to_all_single`` and are summed
   per source token in fp32.

The result equals the single-rank MoE up to bf16 rounding of the per-expert outputs and of the
per-rank partial sums (a close, not bitwise, match). Steps 1, 2 and 4 are collectives: a rank
with fewer tokens waits in them for its peers, which ``SpanTimer`` spans named
``ep_counts``/``ep_dispatch``/``ep_combine`` measure.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from tensorrt_llm_dwdp.parallel.dispatch import experts_per_rank, plan_dispatch
from tensorrt_llm_dwdp.parallel.spans import SpanTimer

logger = logging.getLogger(__name__)


class ExpertsBackend(Protocol):
    def run_experts(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, weights: Any
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class EpCallStats:
    """Rows and pairs one rank sent and received in its last call."""

    rows_sent: int
    rows_received: int
    pairs_sent: int
    pairs_received: int


class ExpertParallelBackend:
    """A MoE backend that runs experts where they live: plug it in where a backend goes.

    ``run_experts(x, topk_ids, topk_weights, weights)`` takes GLOBAL expert ids; ``weights``
    is this rank's ``ExpertWeights`` holding its E/S local experts (what a MoE layer passes as
    its own tensors). Every rank of ``group`` must call it once per MoE layer, even with zero
    tokens. ``timer`` (optional) receives the collective spans.
    """

    def __init__(
        self,
        inner: ExpertsBackend,
        *,
        num_experts: int,
        group: dist.ProcessGroup | None = None,
        timer: SpanTimer | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallelBackend needs torch.distributed initialized first")
        self.inner = inner
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.experts_per_rank = experts_per_rank(num_experts, self.world_size)
        self.timer = timer
        self.last_stats: EpCallStats | None = None

    def _span(self, name: str):
        return self.timer.span(name) if self.timer is not None else nullcontext()

    def _a2a(self, send: torch.Tensor, recv_splits: list[int], send_splits: list[int]) -> torch.Tensor:
        out = send.new_empty((sum(recv_splits), *send.shape[1:]))
        dist.all_to_all_single(out, send, recv_splits, send_splits, group=self.group)
        return out

    def run_experts(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        weights: Any,
    ) -> torch.Tensor:
        """``x [T,H]`` bf16, ``topk_ids [T,k]`` global ids, ``topk_weights [T,k]`` fp32 ->
        ``[T,H]`` bf16, the weighted sum over each token's k experts."""
        if x.dim() != 2 or topk_ids.shape[0] != x.shape[0] or topk_ids.shape != topk_weights.shape:
            raise ValueError(
                f"run_experts: x {tuple(x.shape)}, topk_ids {tuple(topk_ids.shape)} and "
                f"topk_weights {tuple(topk_weights.shape)} disagree (want [T,H], [T,k], [T,k])"
            )
        t, h = x.shape
        s = self.world_size
        plan = plan_dispatch(topk_ids, self.num_experts, s)

        with self._span("ep_counts"):
            send_counts = torch.stack([plan.row_counts, plan.pair_counts], dim=1)   # [S, 2]
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.group)
            send_rows, send_pairs = send_counts.t().tolist()
            recv_rows, recv_pairs = recv_counts.t().tolist()

        # Pair records travel as int32 triples: row, local expert, weight bits.
        pair_w = topk_weights.reshape(-1)[plan.pair_slot].float()
        pair_rec = torch.stack(
            [plan.pair_row.int(), plan.pair_local_expert.int(), pair_w.view(torch.int32)], dim=1
        )
        with self._span("ep_dispatch"):
            x_recv = self._a2a(x[plan.row_token].view(torch.uint8), recv_rows, send_rows)
            rec_recv = self._a2a(pair_rec, recv_pairs, send_pairs)
        x_recv = x_recv.view(x.dtype)

        # Rows from source p start at the sum of the rows received from sources < p.
        row_base = torch.tensor([0] + recv_rows[:-1], device=x.device).cumsum(0)
        src_of_pair = torch.repeat_interleave(
            torch.arange(s, device=x.device), torch.tensor(recv_pairs, device=x.device)
        )
        rows = rec_recv[:, 0].long() + row_base[src_of_pair]
        partial = torch.zeros(x_recv.shape[0], h, dtype=torch.float32, device=x.device)
        if rows.numel():
            y_pairs = self.inner.run_experts(
                x_recv[rows],
                rec_recv[:, 1:2].contiguous(),
                rec_recv[:, 2:3].contiguous().view(torch.float32),
                weights,
            )
            partial.index_add_(0, rows, y_pairs.float())

        with self._span("ep_combine"):
            y_rows = self._a2a(partial.to(x.dtype).view(torch.uint8), send_rows, recv_rows)
        out = torch.zeros(t, h, dtype=torch.float32, device=x.device)
        out.index_add_(0, plan.row_token, y_rows.view(x.dtype).float())
        self.last_stats = EpCallStats(
            rows_sent=sum(send_rows), rows_received=sum(recv_rows),
            pairs_sent=sum(send_pairs), pairs_received=sum(recv_pairs),
        )
        return out.to(x.dtype)
