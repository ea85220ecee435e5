"""Causal attention of one sequence's new tokens over its cached + new keys.

Matches HF's eager path: scores in the activation dtype, softmax in float32 then cast back,
GQA by repeating K/V heads. Sequences are attended one by one (a step mixes prefill and decode
sequences of different lengths; each has its own cache slot).
"""
from __future__ import annotations

import torch

from tensorrt_llm_dwdp.model.batch import BatchInfo


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """``q [n, hq, d]`` at positions ``start..start+n-1``; ``k [start+n, hk, d]``,
    ``v [start+n, hk, dv]``; ``hq`` a multiple of ``hk``. Returns ``[n, hq, dv]``."""
    n, hq, _ = q.shape
    total, hk, _ = k.shape
    if total != start + n:
        raise ValueError(f"causal_attention: {total} keys for {n} queries starting at {start}")
    if hk != hq:
        k = k.repeat_interleave(hq // hk, dim=1)
        v = v.repeat_interleave(hq // hk, dim=1)
    scores = torch.matmul(q.transpose(0, 1), k.permute(1, 2, 0)) * scale  # [hq, n, total]
    q_pos = torch.arange(start, start + n, device=q.device)[:, None]
    k_pos = torch.arange(total, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v.transpose(0, 1)).transpose(0, 1)  # [n, hq, dv]


def sequences(batch: BatchInfo):
    """Yield ``(slot, start, rows)`` per sequence: ``rows`` slices its packed tokens."""
    offsets = batch.offsets
    for i, (slot, start) in enumerate(zip(batch.slots, batch.start_positions)):
        yield slot, start, slice(offsets[i], offsets[i + 1])
