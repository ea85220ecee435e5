"""FP8 block-128 ground truth: e4m3 rounding and saturation, the weight and activation recipes
(zeros, amax at and below the floor, partial edge blocks), and the block-scaled GEMM against a
float64 oracle with stated, derived error bounds."""
import pytest
import torch

from tensorrt_llm_dwdp.quant.fp8 import (
    ACT_AMAX_FLOOR,
    E4M3_MAX,
    FP8_BLOCK,
    blockwise_matmul_ref,
    cast_e4m3,
    dequantize_act_per_token,
    dequantize_weight_blocks,
    expand_weight_scales,
    fp8_linear_ref,
    quantize_act_per_token,
    quantize_weight_blocks,
    weight_scale_shape,
)

U32 = 2.0 ** -24  # float32 unit roundoff
E4M3_HALF_ULP_REL = 2.0 ** -4  # 3 mantissa bits: half an ulp is at most 2^-4 of the value
E4M3_SUBNORMAL_HALF_STEP = 2.0 ** -10  # subnormal spacing 2^-9 (of the scale)

ALL_CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
FINITE_VALUES = ALL_CODES.double()[~torch.isnan(ALL_CODES.float())].unique()


def _nearest_even_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Brute force over every finite e4m3 value: the nearest, ties to the even code, and
    saturation at +-448. Independent of torch's cast."""
    xs = x.double().clamp(-E4M3_MAX, E4M3_MAX)
    dist = (xs[:, None] - FINITE_VALUES[None, :]).abs()
    best = dist.min(dim=1).values
    out = torch.empty_like(xs)
    for i in range(xs.numel()):
        cands = FINITE_VALUES[dist[i] == best[i]]
        if cands.numel() == 1:
            out[i] = cands[0]
            continue
        codes = cands.float().to(torch.float8_e4m3fn).view(torch.uint8)
        out[i] = cands[(codes & 1) == 0][0]
    return out


def _blocks_loop_oracle(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight recipe written block by block with plain slicing (no padding, no reshape)."""
    n, k = w.shape
    nb, kb = weight_scale_shape(n, k)
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    s = torch.empty(nb, kb, dtype=torch.float32)
    for i in range(nb):
        for j in range(kb):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            amax = max(blk.abs().max().item(), ACT_AMAX_FLOOR)
            scale = torch.tensor(amax, dtype=torch.float32) / 448.0
            s[i, j] = scale
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (
                (blk / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            )
    return q, s


def _elementwise_quant_error_bound(x: torch.Tensor, scale_full: torch.Tensor) -> torch.Tensor:
    """Largest |dequant(quant(x)) - x| allowed per element, float64: half an e4m3 ulp of the
    scaled value (2^-4 relative in the normal range, 2^-10 * scale among subnormals), plus a few
    float32 roundings of the scaling and the dequantizing product."""
    x = x.double().abs()
    return (E4M3_HALF_ULP_REL + 8 * U32) * x + E4M3_SUBNORMAL_HALF_STEP * scale_full.double()


def test_act_rounding_is_nearest_even_and_saturating_on_a_dense_grid():
    # One group whose amax is 448 has scale exactly 1.0: the codes are e4m3(x) itself.
    grid = torch.linspace(-448.0, 448.0, 127 * 40 + 1, dtype=torch.float32)
    fine = torch.arange(-256, 257, dtype=torch.float32) / 512.0  # through the subnormals
    ties = FINITE_VALUES[FINITE_VALUES.abs() < 448].float()
    mids = ((ties[1:] + ties[:-1]) / 2).float()  # exact midpoints (ties)
    values = torch.cat([grid, fine, mids, torch.tensor([447.9, -447.9, 0.0, -0.0])])
    for start in range(0, values.numel(), FP8_BLOCK - 1):
        chunk = values[start:start + FP8_BLOCK - 1]
        row = torch.cat([torch.tensor([448.0]), chunk])[None, :]
        q, s = quantize_act_per_token(row)
        assert s.item() == 1.0
        assert torch.equal(q.double()[0, 1:], _nearest_even_e4m3(chunk)), start


def test_cast_saturates():
    big = torch.tensor([448.0, 463.9, 464.0, 500.0, 1e30, -464.0, -1e30])
    assert cast_e4m3(big).float().tolist() == [448.0] * 5 + [-448.0] * 2


def test_weight_recipe_matches_block_loop_on_partial_edge_blocks():
    g = torch.Generator().manual_seed(0)
    for n, k in [(128, 128), (200, 300), (1, 129), (257, 127), (384, 256)]:
        w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3
        w[: min(n, 128), : min(k, 128)] *= 50  # blocks with very different ranges
        q, s = quantize_weight_blocks(w.to(torch.bfloat16))
        q_ref, s_ref = _blocks_loop_oracle(w.to(torch.bfloat16))
        assert s.shape == (-(-n // 128), -(-k // 128)) and s.dtype == torch.float32
        assert q.shape == (n, k) and q.dtype == torch.float8_e4m3fn
        assert torch.equal(s, s_ref), (n, k)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), (n, k)


def test_weight_block_amax_hits_448_and_nothing_is_nan():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 260, generator=g) * 1e3
    q, s = quantize_weight_blocks(w)
    assert not torch.isnan(q.float()).any()
    deq = dequantize_weight_blocks(q, s)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            assert blk.abs().max().item() == 448.0
    bound = _elementwise_quant_error_bound(w, expand_weight_scales(s, 300, 260))
    assert torch.all((deq.double() - w.double()).abs() <= bound)


def test_zero_blocks_and_groups_decode_to_exact_zeros():
    w = torch.zeros(130, 260)
    w[129, 259] = 2.0  # the last (partial) block is not zero
    q, s = quantize_weight_blocks(w)
    floor_scale = torch.tensor(ACT_AMAX_FLOOR, dtype=torch.float32) / 448.0
    assert torch.equal(s[0], floor_scale.expand(3))
    assert s[1, 2].item() == pytest.approx(2.0 / 448.0, rel=1e-7)
    deq = dequantize_weight_blocks(q, s)
    assert torch.equal(deq, w)
    x = torch.zeros(3, 200, dtype=torch.bfloat16)
    xq, xs = quantize_act_per_token(x)
    assert torch.equal(xs, floor_scale.expand(3, 2))
    assert torch.equal(xq.float(), torch.zeros(3, 200))
    assert torch.equal(fp8_linear_ref(x, q[:, :200].contiguous(), s[:, :2].contiguous()),
                       torch.zeros(3, 130, dtype=torch.bfloat16))


def test_amax_at_and_below_the_floor():
    x = torch.zeros(3, 128)
    x[0, 0] = ACT_AMAX_FLOOR  # exactly at the floor: code 448
    x[1, 5] = -ACT_AMAX_FLOOR / 4  # below: the floor's scale, code -112
    x[2, 7] = 1e-11  # far below: 4.5e-5 after scaling, under half the smallest subnormal 2^-9
    xq, xs = quantize_act_per_token(x)
    floor_scale = torch.tensor(ACT_AMAX_FLOOR, dtype=torch.float32) / 448.0
    assert torch.equal(xs, floor_scale.expand(3, 1))
    assert xq[0, 0].float().item() == 448.0
    assert xq[1, 5].float().item() == -112.0
    assert xq[2].float().abs().sum().item() == 0.0
    deq = dequantize_act_per_token(xq, xs)
    bound = _elementwise_quant_error_bound(x, xs.expand(3, 128))
    assert torch.all((deq.double() - x.double()).abs() <= bound)


def test_activation_roundtrip_bound_with_non_multiple_k():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(17, 333, generator=g) * torch.logspace(-3, 3, 17)[:, None]).to(torch.bfloat16)
    xq, xs = quantize_act_per_token(x)
    assert xq.shape == (17, 333) and xs.shape == (17, 3)
    deq = dequantize_act_per_token(xq, xs)
    full = xs.repeat_interleave(128, 1)[:, :333]
    assert torch.all((deq.double() - x.double()).abs() <= _elementwise_quant_error_bound(x, full))
    # Each group's largest magnitude lands on 448 (the recipe scales amax onto e4m3's max).
    for j in range(3):
        assert torch.all(xq[:, j * 128:(j + 1) * 128].float().abs().amax(dim=1) == 448.0)


def test_leading_dims_are_independent_weights():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 256, 192, generator=g) * torch.tensor([1e-3, 1.0, 1e3])[:, None, None]
    q, s = quantize_weight_blocks(w)
    assert s.shape == (3, 2, 2)
    for e in range(3):
        qe, se = quantize_weight_blocks(w[e])
        assert torch.equal(q[e].view(torch.uint8), qe.view(torch.uint8)) and torch.equal(s[e], se)
    assert torch.equal(dequantize_weight_blocks(q, s)[1], dequantize_weight_blocks(q[1], s[1]))


@pytest.mark.parametrize("t,n,k", [(1, 128, 128), (7, 200, 300), (33, 256, 1024), (5, 129, 7168)])
def test_blockwise_matmul_matches_float64_dequantized_oracle(t, n, k):
    """The oracle is exact (float64 of the dequantized e4m3 operands). Each output is a float32
    sum of K exact products plus ceil(K/128) scaled promotions; the classical bound
    |fl(sum) - sum| <= gamma_m * sum |terms|, m = K + 3 ceil(K/128) + 2 roundings, with
    gamma_m = m u / (1 - m u) and u = 2^-24, covers it."""
    g = torch.Generator().manual_seed(t * 1000 + k)
    x = torch.randn(t, k, generator=g).to(torch.bfloat16) * 3
    w = torch.randn(n, k, generator=g) * 0.02
    xq, xs = quantize_act_per_token(x)
    wq, ws = quantize_weight_blocks(w)
    got = blockwise_matmul_ref(xq, xs, wq, ws)
    xd = dequantize_act_per_token(xq, xs).double()
    wd = dequantize_weight_blocks(wq, ws).double()
    exact = xd @ wd.T
    m = k + 3 * -(-k // 128) + 2
    gamma = m * U32 / (1 - m * U32)
    bound = gamma * (xd.abs() @ wd.abs().T)
    err = (got.double() - exact).abs()
    assert torch.all(err <= bound), (err / bound).max().item()
    # The oracle's own dequantized operands are exact in float32 (4 significant bits x scale).
    assert torch.equal(dequantize_weight_blocks(wq, ws).double(), wd)


@pytest.mark.parametrize("t,n,k", [(4, 128, 256), (9, 300, 200)])
def test_fp8_linear_within_quantization_bound_of_the_unquantized_product(t, n, k):
    """|y - x w^T| <= |x| d_w^T + d_x |w|^T + d_x d_w^T (per-element quantization bounds d),
    plus the float32 accumulation bound and one bf16 rounding of the output (2^-9 relative)."""
    g = torch.Generator().manual_seed(n + k)
    x = (torch.randn(t, k, generator=g) * 2).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g) * 0.05
    wq, ws = quantize_weight_blocks(w)
    y = fp8_linear_ref(x, wq, ws)
    assert y.dtype == torch.bfloat16 and y.shape == (t, n)
    xq, xs = quantize_act_per_token(x)
    assert torch.equal(y, blockwise_matmul_ref(xq, xs, wq, ws).to(torch.bfloat16))
    xd, wd = x.double(), w.double()
    dx = _elementwise_quant_error_bound(x, xs.repeat_interleave(128, 1)[:, :k])
    dw = _elementwise_quant_error_bound(w, expand_weight_scales(ws, n, k))
    m = k + 3 * -(-k // 128) + 2
    acc = m * U32 * ((xd.abs() + dx) @ (wd.abs() + dw).T)
    exact = xd @ wd.T
    bound = xd.abs() @ dw.T + dx @ wd.abs().T + dx @ dw.T + acc
    bound = bound + 2.0 ** -9 * (exact.abs() + bound)
    assert torch.all((y.double() - exact).abs() <= bound)
    # Leading dims flatten to tokens.
    y3 = fp8_linear_ref(x.reshape(1, t, k), wq, ws)
    assert torch.equal(y3.reshape(t, n), y)


def test_bad_inputs_are_named():
    w = torch.randn(130, 260)
    q, s = quantize_weight_blocks(w)
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_weight_blocks(torch.full((4, 4), float("nan")))
    with pytest.raises(TypeError, match="bf16/fp16/fp32"):
        quantize_weight_blocks(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"weight_scale_inv shape \(2, 2\) != \(2, 3\)"):
        dequantize_weight_blocks(q, s[:, :2])
    with pytest.raises(TypeError, match="weight_scale_inv must be float32"):
        dequantize_weight_blocks(q, s.to(torch.bfloat16))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        dequantize_weight_blocks(q.float(), s)
    xq, xs = quantize_act_per_token(torch.randn(3, 200))
    with pytest.raises(ValueError, match="same K"):
        blockwise_matmul_ref(xq, xs, q, s)
    with pytest.raises(ValueError, match="last dim must equal"):
        fp8_linear_ref(torch.randn(3, 200, dtype=torch.bfloat16), q, s)
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        quantize_act_per_token(torch.randn(2, 3, 128))


@pytest.mark.gpu
def test_gpu_bits_equal_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = torch.Generator().manual_seed(4)
    w = torch.randn(300, 520, generator=g) * 0.1
    x = torch.randn(37, 520, generator=g).to(torch.bfloat16)
    q, s = quantize_weight_blocks(w)
    qg, sg = quantize_weight_blocks(w.cuda())
    assert torch.equal(qg.cpu().view(torch.uint8), q.view(torch.uint8)) and torch.equal(sg.cpu(), s)
    xq, xs = quantize_act_per_token(x)
    xqg, xsg = quantize_act_per_token(x.cuda())
    assert torch.equal(xqg.cpu().view(torch.uint8), xq.view(torch.uint8)) and torch.equal(xsg.cpu(), xs)
    ref = blockwise_matmul_ref(xq, xs, q, s)
    got = blockwise_matmul_ref(xqg, xsg, qg, sg).cpu()
    xd = dequantize_act_per_token(xq, xs).double()
    wd = dequantize_weight_blocks(q, s).double()
    m = 520 + 3 * 5 + 2
    bound = 2 * m * U32 * (xd.abs() @ wd.abs().T)  # both sides within gamma_m of the same sum
    assert torch.all((got.double() - ref.double()).abs() <= bound)
