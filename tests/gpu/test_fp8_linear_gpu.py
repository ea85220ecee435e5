"""FP8 dense linears on an sm90 GPU: torch's blockwise scaled GEMM (the vendor path Fp8Linear
takes) against the reference block-scaled GEMM of quant/fp8.py, at DeepSeek-V3's projection
shapes and token counts on and off the tiles; the fused activation quantization against the
recipe, bit for bit; a whole FP8 model's prefill and decode on the GPU against the CPU.

Tolerance of vendor vs reference (both see the same e4m3 operands and scales): each rounds its
float32 result to bf16 once (2^-9 relative each), and the tensor cores sum a 128-wide K block
with fewer mantissa bits than float32 before the promotion (about 14 on Hopper, DeepSeek-V3
report section 3.3.2): at most 2^-12 of the block's sum of |products|. So per output
``|vendor - ref| <= 2^-8 |ref| + 2^-12 (|x_dq| @ |w_dq|^T)``, with ``x_dq``/``w_dq`` the
dequantized operands. A wrong scale layout (transposed, unpadded, another block's scale) misses
this by orders of magnitude.
"""
import pytest
import torch

from tensorrt_llm_dwdp.model.fp8_linear import (
    Fp8Linear, fp8_linear_scaled_mm, scaled_mm_weight_scales,
)
from tensorrt_llm_dwdp.quant.fp8 import (
    blockwise_matmul_ref, dequantize_act_per_token, dequantize_weight_blocks,
    quantize_act_per_token, quantize_weight_blocks,
)
from tensorrt_llm_dwdp.quant.fp8_device import quantize_act_per_token_fast

pytestmark = pytest.mark.gpu

# DeepSeek-V3 (N, K): q_a, q_b, kv_a (576 rows: 4.5 blocks), kv_b, o, dense gate, dense down,
# shared-expert down; and a small one
SHAPES = [(1536, 7168), (24576, 1536), (576, 7168), (32768, 512), (7168, 16384), (18432, 7168),
          (7168, 18432), (7168, 2048), (256, 384)]


def _need_sm90():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the blockwise scaled GEMM of torch runs on sm90 only")


def _weights(n, k, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    w[: min(n, 128)] *= 20  # one row block of a very different range: misplaced scales show
    return quantize_weight_blocks(w)


def _assert_within_bound(got: torch.Tensor, x: torch.Tensor, wq: torch.Tensor,
                         ws: torch.Tensor) -> None:
    """``got`` (the vendor path's ``[T, N]`` for input ``x``) within the module docstring's
    bound of the reference block-scaled GEMM."""
    xq, xs = quantize_act_per_token(x)
    ref = blockwise_matmul_ref(xq, xs, wq, ws)
    mag = dequantize_act_per_token(xq, xs).abs() @ dequantize_weight_blocks(wq, ws).abs().T
    bound = 2.0 ** -8 * ref.abs() + 2.0 ** -12 * mag
    excess = ((got.float() - ref).abs() - bound).max().item()
    assert excess <= 0, f"vendor vs reference beyond the stated bound by {excess:.3g}"


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("tokens", [1, 3, 17, 300, 2048])
def test_scaled_mm_matches_reference(n, k, tokens):
    _need_sm90()
    if tokens == 2048 and n * k > 7168 * 7168:
        tokens = 1024  # bounds the reference's float32 scratch
    wq, ws = _weights(n, k, seed=n + k)
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = (torch.randn(tokens, k, device="cuda", generator=gen) * 2).bfloat16()
    x[:, :128] *= 30  # a token group of a very different range
    got = fp8_linear_scaled_mm(x, wq, scaled_mm_weight_scales(ws))
    assert got.shape == (tokens, n)
    _assert_within_bound(got, x, wq, ws)


def test_fused_activation_quantization_is_the_recipe_bit_for_bit():
    """What Fp8Linear's GPU path quantizes with (quant/fp8_device.py: the fused kernel) is the
    reference recipe's bits, scales handed over in the GEMM's outer-dim-major layout."""
    _need_sm90()
    gen = torch.Generator(device="cuda").manual_seed(7)
    x = (torch.randn(4099, 7168, device="cuda", generator=gen)
         * torch.logspace(-3, 3, 4099, device="cuda")[:, None]).bfloat16()
    x[5] = 0  # all-zero token: the floor's scale
    q, s = quantize_act_per_token_fast(x, scale_layout="col")
    q_ref, s_ref = quantize_act_per_token(x)
    assert s.stride() == (1, 4099) and torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_fp8_linear_picks_the_vendor_gemm_on_sm90():
    _need_sm90()
    with torch.device("cuda"):
        lin = Fp8Linear(7168, 576)
        odd = Fp8Linear(200, 64)  # K off the 128 grid: the reference
    assert lin.gemm_backend(torch.device("cuda")) == "scaled_mm"
    assert odd.gemm_backend(torch.device("cuda")) == "reference"
    q, s = _weights(576, 7168, seed=1)
    with torch.no_grad():
        lin.weight.copy_(q)
        lin.weight_scale_inv.copy_(s)
    x = torch.randn(2, 5, 7168, device="cuda").bfloat16()  # 10 token rows: padded to 16
    y = lin(x)
    assert y.shape == (2, 5, 576) and y.dtype == torch.bfloat16
    _assert_within_bound(y.reshape(10, 576), x.reshape(10, 7168), q, s)


@pytest.mark.parametrize("tokens", [1, 3, 17, 64])
def test_siblings_share_one_quantization_bitwise(tokens):
    """MLA's q_a and kv_a (and an MLP's gate and up) quantize their common input once
    (linear_siblings): the outputs equal each module's own call bit for bit, at token counts
    the GEMM pads (1, 3, 17) and one it does not."""
    _need_sm90()
    from tensorrt_llm_dwdp.model.fp8_linear import linear_siblings

    mods = []
    for n in (1536, 576):
        with torch.device("cuda"):
            m = Fp8Linear(7168, n)
        q, s = _weights(n, 7168, seed=n)
        with torch.no_grad():
            m.weight.copy_(q)
            m.weight_scale_inv.copy_(s)
        mods.append(m)
    x = torch.randn(tokens, 7168, device="cuda").bfloat16()
    shared = linear_siblings(x, *mods)
    for m, y in zip(mods, shared):
        assert y.shape == (tokens, m.out_features)
        assert torch.equal(y, m(x))


def test_fp8_model_on_gpu_matches_cpu(tmp_path):
    """An FP8 checkpoint's MLA and dense MLP layers (the vendor GEMM where shapes fit, the
    reference elsewhere; decode through the dequantized kv_b) on the GPU against the CPU,
    prefill and three decode steps fed the same tokens (the CPU's greedy ones): logits within
    the FP8 noise of two accumulation orders (an activation code may round the other way on the
    other device). All layers dense: a routed expert choice flipped by that noise would be a
    discrete jump, and the FP8 experts have their own GPU test (test_fp8_moe.py)."""
    _need_sm90()
    from tensorrt_llm_dwdp.model.batch import BatchInfo
    from tensorrt_llm_dwdp.model.checkpoint import load_model
    from tensorrt_llm_dwdp.model.presets import get_preset
    from tensorrt_llm_dwdp.model.synthetic import write_synthetic_checkpoint

    hf = get_preset("tiny-deepseek-v3-fp8", num_layers=3, overrides={"first_k_dense_replace": 3})
    write_synthetic_checkpoint(tmp_path, hf, quant="fp8", seed=1)
    prompts = ([5, 9, 200, 31, 7], [400, 3, 17, 8, 8, 8, 1, 2, 3, 4, 5, 6])
    models = {d: load_model(tmp_path, device=d) for d in ("cuda", "cpu")}
    caches = {d: m.make_cache(len(prompts), 32, d) for d, m in models.items()}
    batch = BatchInfo((0, 1), (0, 0), tuple(len(p) for p in prompts))
    ids = torch.tensor([t for p in prompts for t in p])
    with torch.inference_mode():
        for step in range(4):
            out = {d: models[d](ids.to(d), batch, caches[d]).float().cpu() for d in models}
            scale = out["cpu"].abs().max().item()
            diff = (out["cuda"] - out["cpu"]).abs().max().item()
            assert diff <= 5e-2 * scale, f"step {step}: max |gpu - cpu| {diff:.3g}, scale {scale:.3g}"
            ids = out["cpu"].argmax(-1)
            batch = BatchInfo(batch.slots, tuple(p + n for p, n in zip(
                batch.start_positions, batch.lengths)), (1, 1))


def test_checkpoint_drawn_on_the_gpu_is_the_same_format(tmp_path):
    """``make-checkpoint --device cuda`` (used for DeepSeek-V3-shaped FP8 checkpoints on the
    device): same keys, shapes and dtypes as a CPU-made one, and it loads."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from tensorrt_llm_dwdp.model.checkpoint import load_model
    from tensorrt_llm_dwdp.model.presets import get_preset
    from tensorrt_llm_dwdp.model.safetensors_io import CheckpointReader
    from tensorrt_llm_dwdp.model.synthetic import write_synthetic_checkpoint

    hf = get_preset("tiny-qwen3-moe-fp8", num_layers=2)
    write_synthetic_checkpoint(tmp_path / "gpu", hf, quant="fp8", device="cuda")
    write_synthetic_checkpoint(tmp_path / "cpu", hf, quant="fp8")
    with CheckpointReader(tmp_path / "gpu") as g, CheckpointReader(tmp_path / "cpu") as c:
        assert {k: (e.dtype, e.shape) for k, e in g.entries.items()} == {
            k: (e.dtype, e.shape) for k, e in c.entries.items()}
    assert load_model(tmp_path / "gpu").moe_modules()[0].local_weights.quant == "fp8"
