"""The engine's attention on the CPU: step metadata, fresh prompts, chunks merged with their
cached prefix, batched decode, each against an fp32 masked-softmax reference."""
import pytest
import torch

from tensorrt_llm_dwdp.engine.attention import (
    CPU_KERNELS, CausalAttention, DecodeAttention, StepMetadata, check_kernels, merge_by_lse,
    reference_attention, select_kernels,
)
from tensorrt_llm_dwdp.model.batch import BatchInfo

TOL = 2e-2  # bf16 inputs and outputs against fp32 math


def rnd(g, *shape):
    return torch.randn(*shape, generator=g).bfloat16()


def test_metadata_indexes_rows_slots_and_step_kind():
    batch = BatchInfo(slots=(2, 0, 3), start_positions=(5, 0, 0), lengths=(3, 4, 2))
    m = StepMetadata.build(batch, max_seqs=4, max_len=16, device=torch.device("cpu"))
    assert m.cache_index.tolist() == [37, 38, 39, 0, 1, 2, 3, 48, 49]
    assert m.fresh_rows == slice(3, 9) and m.fresh_lengths == (4, 2)
    assert m.fresh_cu_seqlens.tolist() == [0, 4, 6] and m.fresh_cu_seqlens.dtype == torch.int32
    assert [(c.slot, c.start, c.rows) for c in m.chunks] == [(2, 5, slice(0, 3))]
    assert m.decode is None
    # a chunk between two fresh prompts: the fresh rows are gathered by index
    m = StepMetadata.build(BatchInfo((0, 1, 2), (0, 4, 0), (2, 3, 1)), 3, 8, torch.device("cpu"))
    assert m.fresh_rows.tolist() == [0, 1, 5]
    # one token after a prefix for every sequence: a decode step
    m = StepMetadata.build(BatchInfo((1, 2), (3, 7), (1, 1)), 4, 8, torch.device("cpu"))
    assert m.decode.lengths.tolist() == [4, 8] and m.decode.max_len == 8
    assert m.decode.slot_range == slice(1, 3) and m.chunks == () and m.fresh_rows is None
    m = StepMetadata.build(BatchInfo((2, 1), (3, 7), (1, 1)), 4, 8, torch.device("cpu"))
    assert m.decode.slot_range is None and m.decode.slots.tolist() == [2, 1]
    m = StepMetadata.build(BatchInfo((2, 1), (3, 7), (1, 1)), 4, 8, torch.device("cpu"), batched_decode=False)
    assert m.decode is None and len(m.chunks) == 2


def test_metadata_bounds_name_the_sequence():
    with pytest.raises(IndexError, match="slot 4"):
        StepMetadata.build(BatchInfo((4,), (0,), (2,)), 4, 8, torch.device("cpu"))
    with pytest.raises(ValueError, match="length 9 > cache max_len 8"):
        StepMetadata.build(BatchInfo((0,), (6,), (3,)), 4, 8, torch.device("cpu"))


def test_merge_by_lse_equals_attention_over_the_union_of_keys():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(5, 3, 8, generator=g), torch.randn(11, 3, 8, generator=g), torch.randn(11, 3, 4, generator=g)
    full, full_lse = reference_attention(q, k, v, start=6, scale=0.4)
    k1, v1, k2, v2 = k[:6], v[:6], k[6:], v[6:]
    o1, l1 = reference_attention(q, k1, v1, start=100, scale=0.4)  # start past the keys: no mask
    o2, l2 = reference_attention(q, k2, v2, start=0, scale=0.4)
    torch.testing.assert_close(merge_by_lse(o1, l1, o2, l2), full)
    torch.testing.assert_close(torch.logaddexp(l1, l2), full_lse)


@pytest.mark.parametrize("heads,kv_heads,dk,dv", [(4, 4, 24, 16), (4, 2, 16, 16), (3, 1, 8, 8)])
def test_cpu_kernels_pass_their_own_check(heads, kv_heads, dk, dv):
    assert select_kernels(torch.device("cpu"), heads, kv_heads, dk, dv, torch.bfloat16) is CPU_KERNELS
    assert check_kernels(CPU_KERNELS, torch.device("cpu"), heads, kv_heads, dk, dv, torch.bfloat16) <= TOL


@pytest.mark.parametrize("heads,kv_heads,dk,dv", [(4, 4, 24, 16), (4, 2, 16, 16)])
def test_causal_attention_mixes_fresh_prompts_and_chunks(heads, kv_heads, dk, dv):
    """Two chunks (one of them a single token) around fresh prompts, in one step: each row
    equals attention over its sequence's cached prefix plus its own causal past."""
    g = torch.Generator().manual_seed(1)
    batch = BatchInfo(slots=(0, 1, 2, 3), start_positions=(0, 9, 0, 20), lengths=(7, 5, 12, 1))
    full_len = {0: 7, 1: 14, 2: 12, 3: 21}
    keys = {s: (rnd(g, n, kv_heads, dk), rnd(g, n, kv_heads, dv)) for s, n in full_len.items()}
    q = rnd(g, batch.num_tokens, heads, dk)
    k = torch.cat([keys[s][0][p:] for s, p in zip(batch.slots, batch.start_positions)])
    v = torch.cat([keys[s][1][p:] for s, p in zip(batch.slots, batch.start_positions)])
    meta = StepMetadata.build(batch, 4, 32, torch.device("cpu"))
    out = CausalAttention(dk ** -0.5)(q, k, v, meta, lambda slot, end: (keys[slot][0][:end], keys[slot][1][:end]))
    for i, (slot, start) in enumerate(zip(batch.slots, batch.start_positions)):
        rows = slice(batch.offsets[i], batch.offsets[i + 1])
        ref, _ = reference_attention(q[rows], *keys[slot], start, dk ** -0.5)
        assert (out[rows].float() - ref).abs().max() <= TOL, f"sequence {i}"


def test_decode_attention_masks_each_sequence_to_its_length():
    g = torch.Generator().manual_seed(2)
    b, hk, grp, d, L = 3, 2, 2, 16, 9
    lengths = torch.tensor([9, 4, 1])
    q, k, v = rnd(g, b, hk, grp, d), rnd(g, b, L, hk, d), rnd(g, b, L, hk, d)
    k[1, 4:] = float("nan")  # beyond a sequence's length: masked out of the scores
    v[2, 1:] = 1e30          # weighted by an exact 0 (stale cache rows are finite)
    out = DecodeAttention(0.3)(q, k, v, lengths)
    for i in range(b):
        n = int(lengths[i])
        ref, _ = reference_attention(q[i].reshape(1, hk * grp, d), k[i, :n], v[i, :n], n - 1, 0.3)
        assert (out[i].reshape(hk * grp, d).float() - ref[0]).abs().max() <= TOL


def test_decode_attention_adds_the_second_score_term():
    """MLA's latent decode: scores = q.latent + q_rope.k_rope over one shared kv head."""
    g = torch.Generator().manual_seed(3)
    b, h, dl, dr, L = 2, 4, 32, 8, 6
    q, q2 = rnd(g, b, 1, h, dl), rnd(g, b, 1, h, dr)
    lat, rot = rnd(g, b, L, 1, dl), rnd(g, b, L, 1, dr)
    out = DecodeAttention(0.2)(q, lat, lat, torch.tensor([6, 3]), q2, rot)
    for i, n in enumerate((6, 3)):
        ref, _ = reference_attention(torch.cat((q[i, 0], q2[i, 0]), -1)[None],
                                     torch.cat((lat[i, :n], rot[i, :n]), -1), lat[i, :n], n - 1, 0.2)
        assert (out[i, 0].float() - ref[0]).abs().max() <= TOL


def _math(q, k, v, causal, scale):
    """[.., L, d] x [.., S, d]: fp32 attention (top-left causal) and its log-sum-exp."""
    s = torch.einsum("...ld,...sd->...ls", q.float(), k.float()) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("...ls,...sd->...ld", torch.softmax(s, -1), v.float()), torch.logsumexp(s, -1)


def test_cuda_kernel_glue_against_stand_ins_for_torchs_private_ops(monkeypatch):
    """The CUDA candidates' glue (layouts, the ragged call, lse shapes, the per-prompt loop),
    with torch's private CUDA ops replaced by fp32 math that returns what they are documented
    to return: [B, H, L, dv] outputs in the query's layout, cuDNN's lse [B, H, L, 1],
    efficient attention's lse padded to 32 queries, the ragged op's [T, H, dv]."""
    from tensorrt_llm_dwdp.engine import attention as A

    def cudnn_dense(q, k, v, bias, want_lse, dropout, causal, debug, scale=None):
        out, lse = _math(q, k, v, causal, scale)
        out = out.to(q.dtype).transpose(1, 2).contiguous().transpose(1, 2)
        return out, lse[..., None], None, None, q.shape[2], k.shape[2], None, None, None

    def cudnn_varlen(q, k, v, bias, cu_q, cu_k, max_q, max_k, want_lse, dropout, causal, debug, scale=None):
        assert cu_q.dtype == torch.int32 and max_q >= int((cu_q[1:] - cu_q[:-1]).max())
        out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype)
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            o, _ = _math(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), causal, scale)
            out[a:b] = o.transpose(0, 1).to(q.dtype)
        return out, None, cu_q, cu_k, max_q, max_k, None, None, None

    def efficient(q, k, v, bias, want_lse, dropout, causal, scale=None):
        out, lse = _math(q, k, v, causal, scale)
        pad = -(-q.shape[2] // 32) * 32 - q.shape[2]
        return out.to(q.dtype), torch.nn.functional.pad(lse, (0, pad), value=float("inf")), None, None

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", cudnn_dense)
    monkeypatch.setattr(torch.ops.aten, "_cudnn_attention_forward", cudnn_varlen)
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", efficient)
    for cand in A.CUDA_CANDIDATES:
        for shape in ((4, 4, 24, 16), (4, 2, 16, 16)):
            err = check_kernels(cand, torch.device("cpu"), *shape, torch.bfloat16)
            assert err <= TOL, (cand.name, shape, err)
