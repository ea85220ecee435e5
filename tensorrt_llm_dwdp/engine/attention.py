"""Attention of one forward step over the slot KV cache: the engine's kernels.

The model's attention modules project q/k/v and own the cache layout; this module decides how a
step's sequences attend, with one kernel call per layer wherever torch has one:

- fresh prompts (nothing cached yet): causal attention over their own tokens, one fused call per
  prompt (cuDNN on CUDA, torch's flash kernel on the CPU, which has no varlen kernel). On CUDA a
  step with very many fresh prompts (``RAGGED_MIN_PROMPTS``) makes one ragged (variable-length)
  cuDNN call for all of them instead: measured, that call costs ~45 ms whatever its size in
  this torch/cuDNN build, so it only pays once per-prompt launches cost more.
- a chunk of a long prompt (``start > 0``): the chunk attends to the cached prefix (no mask) and
  to itself (causal); the two partial results merge by their log-sum-exp. This is causal
  attention with an offset, computed by two fused calls whose memory is linear in the prompt.
- decode (one new token per sequence): every running sequence in one batched call over the
  padded slot cache with a length mask (``decode_attention``).

Kernels are chosen once per (device, head counts, head dims, dtype) by ``select_kernels``. On
CUDA each candidate (cuDNN per prompt with the ragged call, the same without it, torch SDPA per
prompt) is first checked on a small problem against an fp32 reference; a candidate that raises
or disagrees is skipped with a logged reason, so a torch build whose private cuDNN ops differ
still runs correctly (slower).
All kernels take ``q [n, Hq, dk]``, ``k [n, Hkv, dk]``, ``v [n, Hkv, dv]`` (tokens first).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # the model package imports this module: no import of it at run time
    from tensorrt_llm_dwdp.model.batch import BatchInfo

logger = logging.getLogger(__name__)

PrefixFn = Callable[[int, int], "tuple[torch.Tensor, torch.Tensor]"]


# ----------------------------------------------------------------------------- step metadata
@dataclass(frozen=True)
class ChunkSeq:
    """A sequence whose new tokens follow ``start`` cached ones (a prompt chunk)."""

    slot: int
    start: int
    rows: slice


@dataclass(frozen=True)
class DecodeBatch:
    """One new token per sequence: slots, valid key counts (``start + 1``), the longest."""

    slots: torch.Tensor        # int64 [B]
    lengths: torch.Tensor      # int64 [B]
    max_len: int
    slot_range: slice | None   # the slots as a range when they are consecutive and ascending


@dataclass(frozen=True, eq=False)
class StepMetadata:
    """Built once per step from a ``BatchInfo``; every layer's attention reads it.

    ``cache_index [N]``: flat cache position (``slot * max_len + position``) of each packed
    token. Fresh sequences (start 0) occupy ``fresh_rows`` of the packed tokens, with
    ``fresh_cu_seqlens`` (int32, device) for the ragged call. ``decode`` is set when every
    sequence brings one token after a cached prefix; then ``fresh`` and ``chunks`` are empty.
    ``batch`` is None in a decode graph's static metadata (``engine.decode_graphs``).
    """

    batch: BatchInfo | None
    cache_index: torch.Tensor
    fresh_rows: slice | torch.Tensor | None
    fresh_lengths: tuple[int, ...]
    fresh_cu_seqlens: torch.Tensor | None
    chunks: tuple[ChunkSeq, ...]
    decode: DecodeBatch | None

    @classmethod
    def build(cls, batch: BatchInfo, max_seqs: int, max_len: int, device: torch.device,
              batched_decode: bool = True) -> "StepMetadata":
        """``batched_decode=False`` treats a decode step's tokens as one-token chunks: each
        sequence then attends through the prefill kernels on its own (the reference path)."""
        offsets = batch.offsets
        index = []
        for i, (slot, start, n) in enumerate(zip(batch.slots, batch.start_positions, batch.lengths)):
            if not 0 <= slot < max_seqs:
                raise IndexError(f"sequence {i}: cache slot {slot} out of range [0, {max_seqs})")
            if start + n > max_len:
                raise ValueError(f"sequence {i} in slot {slot} reaches length {start + n} > cache "
                                 f"max_len {max_len}")
            index.append(torch.arange(slot * max_len + start, slot * max_len + start + n))
        cache_index = torch.cat(index).to(device)
        if batched_decode and all(n == 1 and s > 0 for s, n in zip(batch.start_positions, batch.lengths)):
            slots = list(batch.slots)
            consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
            lengths = [s + 1 for s in batch.start_positions]
            decode = DecodeBatch(torch.tensor(slots, device=device), torch.tensor(lengths, device=device),
                                 max(lengths), slice(slots[0], slots[-1] + 1) if consecutive else None)
            return cls(batch, cache_index, None, (), None, (), decode)
        fresh = [i for i, s in enumerate(batch.start_positions) if s == 0]
        chunks = tuple(ChunkSeq(batch.slots[i], batch.start_positions[i], slice(offsets[i], offsets[i + 1]))
                       for i, s in enumerate(batch.start_positions) if s > 0)
        rows: slice | torch.Tensor | None = None
        cu = None
        lengths = tuple(batch.lengths[i] for i in fresh)
        if fresh:
            if fresh == list(range(fresh[0], fresh[-1] + 1)):
                rows = slice(offsets[fresh[0]], offsets[fresh[-1] + 1])
            else:
                rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in fresh]).to(device)
            cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        return cls(batch, cache_index, rows, lengths, cu, chunks, None)


# ----------------------------------------------------------------------------- kernels
def _bhsd(x: torch.Tensor) -> torch.Tensor:
    """``[n, H, d]`` -> ``[1, H, n, d]`` (a view)."""
    return x.transpose(0, 1).unsqueeze(0)


def _thd(x: torch.Tensor) -> torch.Tensor:
    """``[1, H, n, d]`` -> ``[n, H, d]`` (a view)."""
    return x[0].transpose(0, 1)


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[n, Hkv, d]`` -> ``[n, heads, d]``, each kv head serving ``heads / Hkv`` query heads."""
    hkv = x.shape[1]
    return x if hkv == heads else x.repeat_interleave(heads // hkv, dim=1)


def _pad_last(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x if x.shape[-1] == dim else F.pad(x, (0, dim - x.shape[-1]))


def merge_by_lse(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Softmax-weighted sum of two partial attentions over disjoint key sets.

    ``o [n, H, dv]``, ``lse [n, H]`` (float32 log-sum-exp of each row's scaled scores).
    """
    m = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    out = o1.float() * w1[..., None] + o2.float() * w2[..., None]
    return (out / (w1 + w2)[..., None]).to(o1.dtype)


@dataclass(frozen=True)
class Kernels:
    """One device's prefill kernels.

    ``fresh(q, k, v, lengths, cu_seqlens, scale)``: causal attention of packed fresh sequences,
    one fused call per prompt. ``ragged`` (same signature, or None): one variable-length call
    for all of them, used when a step holds at least ``ragged_min_prompts`` fresh prompts.
    ``with_lse(q, k, v, causal, scale) -> (out [n, H, dv], lse [n, H] fp32)``: one sequence.
    """

    name: str
    fresh: Callable[..., torch.Tensor]
    with_lse: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    ragged: Callable[..., torch.Tensor] | None = None
    ragged_min_prompts: int = 0

    @property
    def label(self) -> str:
        return self.name + (f"+ragged(>={self.ragged_min_prompts} prompts)" if self.ragged else "")

    def attend_fresh(self, q, k, v, lengths, cu_seqlens, scale) -> torch.Tensor:
        if self.ragged is not None and len(lengths) >= self.ragged_min_prompts:
            return self.ragged(q, k, v, lengths, cu_seqlens, scale)
        return self.fresh(q, k, v, lengths, cu_seqlens, scale)


def _per_sequence(attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
    def fresh(q, k, v, lengths, cu_seqlens, scale):
        if len(lengths) == 1:
            return attend(q, k, v, scale)
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
        start = 0
        for n in lengths:
            rows = slice(start, start + n)
            out[rows] = attend(q[rows], k[rows], v[rows], scale)
            start += n
        return out
    return fresh


# CPU: torch's fused flash kernel (memory linear in the prompt). It needs equal qk and v head
# dims, so MLA's v is zero-padded to the qk dim and the padding sliced off.
def _cpu_causal(q, k, v, scale):
    dv = v.shape[-1]
    out = F.scaled_dot_product_attention(_bhsd(q), _bhsd(k), _bhsd(_pad_last(v, q.shape[-1])),
                                         is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return _thd(out)[..., :dv]


def _cpu_with_lse(q, k, v, causal, scale):
    dv = v.shape[-1]
    heads = q.shape[1]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _bhsd(q), _bhsd(_repeat_kv(k, heads)), _bhsd(_pad_last(_repeat_kv(v, heads), q.shape[-1])),
        0.0, causal, scale=scale)
    return _thd(out)[..., :dv], lse[0].transpose(0, 1)


# CUDA: cuDNN's fused attention (torch's private entry points, the ones SDPA and nested tensors
# dispatch to; the head counts are equalised and the operands made contiguous, [n, H, d], first).
def _cudnn_varlen(q, k, v, lengths, cu_seqlens, scale):
    heads = q.shape[1]
    k, v = _repeat_kv(k, heads).contiguous(), _repeat_kv(v, heads).contiguous()
    # The longest prompt only sizes the plan (the ragged offsets bound each prompt), so it is
    # rounded up to a power of two: steps of other lengths reuse cuDNN's cached plans.
    max_len = 1 << (max(lengths) - 1).bit_length()
    return torch.ops.aten._cudnn_attention_forward(
        q.contiguous(), k, v, None, cu_seqlens, cu_seqlens, max_len, max_len, False, 0.0, True, False,
        scale=scale)[0]


def _lse_rows(lse: torch.Tensor, n: int) -> torch.Tensor:
    """A kernel's log-sum-exp ``[1, H, >= n(, 1)]`` -> ``[n, H]`` (efficient attention pads
    the query dim, cuDNN adds a trailing 1)."""
    if lse.dim() == 4:
        lse = lse[..., 0]
    if lse.dim() != 3 or lse.shape[0] != 1 or lse.shape[-1] < n:
        raise RuntimeError(f"unexpected log-sum-exp shape {tuple(lse.shape)} for {n} queries")
    return lse[0, :, :n].transpose(0, 1)


def _cudnn_dense(q, k, v, causal, scale, lse):
    heads = q.shape[1]
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        _bhsd(q.contiguous()), _bhsd(_repeat_kv(k, heads).contiguous()),
        _bhsd(_repeat_kv(v, heads).contiguous()), None, lse, 0.0, causal, False, scale=scale)
    return _thd(res[0]), (_lse_rows(res[1], q.shape[0]) if lse else None)


def _cudnn_causal(q, k, v, scale):
    return _cudnn_dense(q, k, v, True, scale, False)[0]


def _cudnn_with_lse(q, k, v, causal, scale):
    return _cudnn_dense(q, k, v, causal, scale, True)


def _sdpa_causal(q, k, v, scale):
    heads = q.shape[1]
    return _thd(F.scaled_dot_product_attention(_bhsd(q), _bhsd(_repeat_kv(k, heads)),
                                               _bhsd(_repeat_kv(v, heads)), is_causal=True, scale=scale))


def _efficient_with_lse(q, k, v, causal, scale):
    heads = q.shape[1]
    res = torch.ops.aten._scaled_dot_product_efficient_attention(
        _bhsd(q.contiguous()), _bhsd(_repeat_kv(k, heads).contiguous()),
        _bhsd(_repeat_kv(v, heads).contiguous()), None, True, 0.0, causal, scale=scale)
    return _thd(res[0]), _lse_rows(res[1], q.shape[0])


# Measured on one H200 (torch 2.11, cuDNN 9.19, MLA shapes: 128 heads, qk 192, v 128;
# bench/results/prefill_breakdown_h200): one dense cuDNN call per prompt runs at 477 TFLOP/s
# (2K prompts) to 639 (8K); cuDNN's ragged call took 43-54 ms per call whatever its size
# (1 x 2K: 46 ms; 256 x 64 tokens: 44 ms; 1 x 32K: 125 ms), where a launch-bound per-prompt
# call costs about 70 us (256 x 64 tokens: 17.9 ms). The ragged call therefore pays only past
# about 640 prompts in one step.
RAGGED_MIN_PROMPTS = 640

CPU_KERNELS = Kernels("cpu-flash", _per_sequence(_cpu_causal), _cpu_with_lse)
CUDA_CANDIDATES = (
    Kernels("cudnn", _per_sequence(_cudnn_causal), _cudnn_with_lse, _cudnn_varlen, RAGGED_MIN_PROMPTS),
    Kernels("sdpa", _per_sequence(_sdpa_causal), _efficient_with_lse),
)


def reference_attention(q, k, v, start: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 math: ``q [n, Hq, dk]`` at positions ``start..`` over ``k/v [start + n, Hkv, d]``.
    Returns (out [n, Hq, dv] fp32, lse [n, Hq] fp32). Quadratic memory: tests and probes only."""
    n, heads = q.shape[0], q.shape[1]
    k, v = _repeat_kv(k, heads).float(), _repeat_kv(v, heads).float()
    s = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    mask = torch.arange(k.shape[0], device=q.device)[None, :] > torch.arange(start, start + n, device=q.device)[:, None]
    s = s.masked_fill(mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v), torch.logsumexp(s, -1).transpose(0, 1)


def check_kernels(kernels: Kernels, device: torch.device, heads: int, kv_heads: int, dk: int, dv: int,
                  dtype: torch.dtype, tol: float = 2e-2) -> float:
    """Max abs error of ``kernels`` against ``reference_attention`` on two ragged prompts (per
    prompt and, if present, in one ragged call), a chunk with a prefix (merged by lse) and a
    one-token query; raises when a kernel does."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    lengths = (37, 70)
    n = sum(lengths)
    q, k = rnd(n, heads, dk), rnd(n, kv_heads, dk)
    v = rnd(n, kv_heads, dv + 8)[..., 8:]  # a strided view, as MLA's values are
    cu = torch.tensor([0, lengths[0], n], dtype=torch.int32, device=device)
    err = 0.0
    for fresh in (kernels.fresh, kernels.ragged):
        if fresh is None:
            continue
        out = fresh(q, k, v, lengths, cu, dk ** -0.5)
        for rows in (slice(0, lengths[0]), slice(lengths[0], n)):
            ref, _ = reference_attention(q[rows], k[rows], v[rows], 0, dk ** -0.5)
            err = max(err, (out[rows].float() - ref).abs().max().item())
    start = 45  # the last 25 tokens of the second prompt as a chunk over a 45-token prefix
    q2, k2, v2 = q[lengths[0]:][start:], k[lengths[0]:], v[lengths[0]:]
    o1, l1 = kernels.with_lse(q2, k2[:start], v2[:start], False, dk ** -0.5)
    o2, l2 = kernels.with_lse(q2, k2[start:], v2[start:], True, dk ** -0.5)
    ref, ref_lse = reference_attention(q2, k2, v2, start, dk ** -0.5)
    merged = merge_by_lse(o1, l1, o2, l2)
    err = max(err, (merged.float() - ref).abs().max().item())
    err = max(err, (torch.logaddexp(l1, l2) - ref_lse).abs().max().item())
    one, _ = kernels.with_lse(q2[-1:], k2, v2, False, dk ** -0.5)  # a one-token chunk: one call
    return max(err, (one.float() - ref[-1:]).abs().max().item())


@functools.lru_cache(maxsize=None)
def select_kernels(device: torch.device, heads: int, kv_heads: int, dk: int, dv: int,
                   dtype: torch.dtype) -> Kernels:
    """The prefill kernels for these shapes on ``device`` (checked once, then cached)."""
    if device.type != "cuda":
        return CPU_KERNELS
    reasons = []
    variants = [v for c in CUDA_CANDIDATES for v in ((c, replace(c, ragged=None)) if c.ragged else (c,))]
    for cand in variants:
        try:
            err = check_kernels(cand, device, heads, kv_heads, dk, dv, dtype)
        except Exception as exc:  # an op missing or refusing these shapes in this torch build
            reasons.append(f"{cand.label}: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        if err <= 2e-2:
            logger.info("attention kernels on %s for %d/%d heads, dims %d/%d: %s%s", device, heads,
                        kv_heads, dk, dv, cand.label, f" (skipped {reasons})" if reasons else "")
            return cand
        reasons.append(f"{cand.label}: max error {err:.3g} against the fp32 reference")
    raise RuntimeError(f"no attention kernel works on {device} for {heads}/{kv_heads} heads, dims "
                       f"{dk}/{dv}, {dtype}: {reasons}")


# ----------------------------------------------------------------------------- modules
class CausalAttention(nn.Module):
    """Prefill attention of a step: fresh prompts in one call, chunks merged with their prefix.

    ``forward(q [N, Hq, dk], k [N, Hkv, dk], v [N, Hkv, dv], meta, prefix) -> [N, Hq, dv]`` for
    the step's packed new tokens; ``prefix(slot, end)`` returns the cached ``(k, v)`` of
    positions ``[0, end)`` of a chunked sequence (in the same head layout as ``k``, ``v``); the
    step's own tokens are already in the cache.
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: StepMetadata,
                prefix: PrefixFn) -> torch.Tensor:
        kernels = select_kernels(q.device, q.shape[1], k.shape[1], q.shape[-1], v.shape[-1], q.dtype)
        rows = meta.fresh_rows
        if isinstance(rows, slice) and rows == slice(0, q.shape[0]):
            return kernels.attend_fresh(q, k, v, meta.fresh_lengths, meta.fresh_cu_seqlens, self.scale)
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
        if rows is not None:
            out[rows] = kernels.attend_fresh(q[rows], k[rows], v[rows], meta.fresh_lengths,
                                             meta.fresh_cu_seqlens, self.scale)
        for c in meta.chunks:
            if c.rows.stop - c.rows.start == 1:  # one token sees every key: one call, no merge
                k_all, v_all = prefix(c.slot, c.start + 1)
                out[c.rows] = kernels.with_lse(q[c.rows], k_all, v_all, False, self.scale)[0]
                continue
            k_pre, v_pre = prefix(c.slot, c.start)
            o1, l1 = kernels.with_lse(q[c.rows], k_pre, v_pre, False, self.scale)
            o2, l2 = kernels.with_lse(q[c.rows], k[c.rows], v[c.rows], True, self.scale)
            out[c.rows] = merge_by_lse(o1, l1, o2, l2)
        return out


class DecodeAttention(nn.Module):
    """One new token per sequence, all sequences in one batched call over the padded cache.

    ``forward(q [B, Hkv, G, dk], k [B, L, Hkv, dk], v [B, L, Hkv, dv], lengths [B]) ->
    [B, Hkv, G, dv]``: query head group ``G`` of kv head ``h`` attends to the first
    ``lengths[b]`` keys. An optional second score term ``q2 . k2`` (MLA's rotary part, the
    latent being ``k`` and ``v``) is added before the softmax. Scores are materialised
    (``B x H x L`` floats: linear in the context) and the softmax runs in float32. Keys past a
    sequence's length are masked; values there get an exact zero weight (they must be finite:
    stale cache rows written by earlier steps are).
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                q2: torch.Tensor | None = None, k2: torch.Tensor | None = None) -> torch.Tensor:
        scores = torch.matmul(q, k.permute(0, 2, 3, 1)).float()
        if q2 is not None:
            scores = scores + torch.matmul(q2, k2.permute(0, 2, 3, 1)).float()
        pad = torch.arange(k.shape[1], device=k.device)[None, :] >= lengths[:, None]
        scores = (scores * self.scale).masked_fill(pad[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        return torch.matmul(probs, v.permute(0, 2, 1, 3))
