"""Top-k routers: Qwen3-MoE softmax top-k and DeepSeek-V3 sigmoid group-limited top-k.

Both match Hugging Face transformers (``Qwen3MoeTopKRouter``, ``DeepseekV3TopkRouter``) on the
selected expert set and the weights, and differ only where HF leaves things unspecified: ids
come out sorted by descending selection score, and equal scores pick the lower expert (or
group) id first (stable sorts instead of ``torch.topk``), so routing is deterministic.
Every function takes router logits ``[T, E]`` (any float dtype; computed on in float32) and
returns ``(ids int32 [T, k], weights float32 [T, k])``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ROUTER_KINDS = ("softmax", "deepseek_v3")


def _check_logits(logits: torch.Tensor, k: int, what: str) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"{what}: logits must be a float [T, E] tensor, got "
                         f"{logits.dtype} {tuple(logits.shape)}")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"{what}: k={k} must be in [1, num_experts={logits.shape[1]}]")


def _top_k_desc(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries per row, ties to the lower index (stable sort)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


def softmax_topk(
    logits: torch.Tensor, k: int, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE routing: float32 softmax over all experts, top-k, optionally renormalised
    to sum 1 (``norm_topk_prob``)."""
    _check_logits(logits, k, "softmax_topk")
    probs = torch.softmax(logits.float(), dim=-1)
    ids = _top_k_desc(probs, k)
    weights = probs.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids.to(torch.int32), weights


def deepseek_v3_topk(
    logits: torch.Tensor,
    correction_bias: torch.Tensor,
    k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing (noaux_tc).

    ``scores = sigmoid(logits)``; selection uses ``scores + correction_bias``: experts are split
    into ``n_group`` equal groups, a group scores the sum of its top-2 biased scores, the
    ``topk_group`` best groups stay eligible, and the top-k eligible experts are chosen. The
    weights are the UNBIASED scores of the chosen experts, divided by their sum (+1e-20) when
    ``norm_topk_prob``, times ``routed_scaling_factor``.
    """
    _check_logits(logits, k, "deepseek_v3_topk")
    num_experts = logits.shape[1]
    if n_group < 1 or num_experts % n_group:
        raise ValueError(
            f"deepseek_v3_topk: n_group={n_group} must divide num_experts={num_experts}"
        )
    group_size = num_experts // n_group
    if group_size < 2:
        raise ValueError(
            f"deepseek_v3_topk: groups need >= 2 experts (top-2 group score); "
            f"num_experts={num_experts}, n_group={n_group}"
        )
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"deepseek_v3_topk: topk_group={topk_group} must be in [1, {n_group}]")
    if k > topk_group * group_size:
        raise ValueError(
            f"deepseek_v3_topk: k={k} exceeds the {topk_group * group_size} experts of the "
            f"topk_group={topk_group} selected groups"
        )
    if tuple(correction_bias.shape) != (num_experts,):
        raise ValueError(
            f"deepseek_v3_topk: correction_bias shape {tuple(correction_bias.shape)} != "
            f"({num_experts},)"
        )
    tokens = logits.shape[0]
    scores = torch.sigmoid(logits.float())
    biased = scores + correction_bias.float()
    grouped = biased.view(tokens, n_group, group_size)
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    keep_groups = _top_k_desc(group_scores, topk_group)
    group_mask = torch.zeros(tokens, n_group, dtype=torch.bool, device=logits.device)
    group_mask.scatter_(1, keep_groups, True)
    expert_mask = group_mask.unsqueeze(-1).expand(tokens, n_group, group_size).reshape(
        tokens, num_experts
    )
    eligible = biased.masked_fill(~expert_mask, float("-inf"))
    ids = _top_k_desc(eligible, k)
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids.to(torch.int32), weights * routed_scaling_factor


@dataclass(frozen=True)
class RouterConfig:
    """How a MoE layer routes. ``kind='softmax'`` uses ``renormalize``; ``kind='deepseek_v3'``
    uses ``n_group``, ``topk_group``, ``routed_scaling_factor`` and ``renormalize`` (as
    ``norm_topk_prob``) and owns an ``e_score_correction_bias``."""

    kind: str = "softmax"
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ROUTER_KINDS:
            raise ValueError(f"RouterConfig.kind={self.kind!r}; choose one of {ROUTER_KINDS}")
        if self.n_group < 1 or self.topk_group < 1 or self.topk_group > self.n_group:
            raise ValueError(
                f"RouterConfig: need 1 <= topk_group ({self.topk_group}) <= n_group "
                f"({self.n_group})"
            )


def route(
    config: RouterConfig,
    logits: torch.Tensor,
    k: int,
    correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on ``config.kind``; ``correction_bias`` is required for 'deepseek_v3'."""
    if config.kind == "softmax":
        return softmax_topk(logits, k, config.renormalize)
    if correction_bias is None:
        raise ValueError("route: kind 'deepseek_v3' needs correction_bias [E]")
    return deepseek_v3_topk(
        logits, correction_bias, k, config.n_group, config.topk_group,
        config.routed_scaling_factor, config.renormalize,
    )
