"""FP8 block-128 checkpoints: the published format's names and dtypes, loading bit for bit into
Fp8Linear and the fp8 expert tensors, and bad files refused naming the tensor or field before
any weight is read."""
import argparse
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tensorrt_llm_dwdp.cli.commands import check_config, make_checkpoint
from tensorrt_llm_dwdp.model import checkpoint as checkpoint_mod
from tensorrt_llm_dwdp.model.checkpoint import load_model, read_config
from tensorrt_llm_dwdp.model.fp8_linear import Fp8Linear, convert_linears_, dense_weight
from tensorrt_llm_dwdp.model.hf_names import expert_key
from tensorrt_llm_dwdp.model.presets import get_preset
from tensorrt_llm_dwdp.model.synthetic import write_synthetic_checkpoint
from tensorrt_llm_dwdp.quant.fp8 import dequantize_weight_blocks, fp8_linear_ref, quantize_weight_blocks

from _model_oracle_utils import write_checkpoint

DS = "tiny-deepseek-v3-fp8"
QWEN = "tiny-qwen3-moe-fp8"


def _tensors(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def _config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def ds_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds")
    write_synthetic_checkpoint(path, get_preset(DS, num_layers=2), quant="fp8", seed=3)
    return path


def test_deepseek_format_matches_the_published_checkpoint(ds_ckpt):
    hf = _config(ds_ckpt)
    assert hf["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3",
                                         "quant_method": "fp8", "weight_block_size": [128, 128]}
    t = _tensors(ds_ckpt)
    fp8 = {k for k, v in t.items() if v.dtype == torch.float8_e4m3fn}
    # every projection linear of DeepSeek-V3's FP8 release, dense and expert
    for layer, proj in [(0, "self_attn.q_a_proj"), (0, "self_attn.q_b_proj"),
                        (0, "self_attn.kv_a_proj_with_mqa"), (0, "self_attn.kv_b_proj"),
                        (0, "self_attn.o_proj"), (0, "mlp.gate_proj"), (0, "mlp.down_proj"),
                        (1, "mlp.shared_experts.up_proj"), (1, "mlp.experts.15.down_proj")]:
        key = f"model.layers.{layer}.{proj}.weight"
        assert key in fp8, key
        n, k = t[key].shape
        scale = t[f"model.layers.{layer}.{proj}.weight_scale_inv"]
        assert scale.dtype == torch.float32 and scale.shape == (-(-n // 128), -(-k // 128)), key
    assert {k[: -len(".weight")] for k in fp8} == {
        k[: -len(".weight_scale_inv")] for k in t if k.endswith(".weight_scale_inv")}
    unquantized = {"model.embed_tokens.weight": torch.bfloat16, "lm_head.weight": torch.bfloat16,
                   "model.norm.weight": torch.bfloat16,
                   "model.layers.0.self_attn.kv_a_layernorm.weight": torch.bfloat16,
                   "model.layers.0.self_attn.q_a_layernorm.weight": torch.bfloat16,
                   "model.layers.1.mlp.gate.weight": torch.bfloat16,
                   "model.layers.1.mlp.gate.e_score_correction_bias": torch.float32}
    for key, dtype in unquantized.items():
        assert t[key].dtype == dtype, key
    # kv_a's 32 + 8 rows are one partial block: the real 576 rows are 4.5 blocks
    assert t["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (1, 1)


def test_qwen_format_lists_unconverted_modules(tmp_path):
    write_synthetic_checkpoint(tmp_path, get_preset(QWEN, num_layers=2), quant="fp8")
    qc = _config(tmp_path)["quantization_config"]
    assert qc["quant_method"] == "fp8" and "lm_head" in qc["modules_to_not_convert"]
    assert "model.layers.1.mlp.gate" in qc["modules_to_not_convert"]
    t = _tensors(tmp_path)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert t[f"model.layers.0.self_attn.{proj}.weight"].dtype == torch.float8_e4m3fn
    assert t["model.layers.0.self_attn.q_norm.weight"].dtype == torch.bfloat16
    assert t["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16


def test_load_is_bit_for_bit(ds_ckpt):
    cfg, quant = read_config(ds_ckpt)
    assert quant == "fp8" and cfg.linear_quant == "fp8"
    files = _tensors(ds_ckpt)
    model = load_model(ds_ckpt)
    linears = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert len(linears) == 5 + 3 + 5 + 3  # MLA x2 layers, dense MLP, shared experts
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    u8 = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # noqa: E731
    for name, t in model.state_dict().items():
        key = name.replace(".mlp.experts.gate.", ".mlp.gate.")
        if t.dtype == torch.float8_e4m3fn or key.endswith("weight_scale_inv"):
            assert files[key].dtype == t.dtype, name
        assert torch.equal(u8(t), u8(files[key].to(t.dtype))), name
    inter = cfg.moe_intermediate_size
    p = model.moe_modules()[1].local_weights.tensors
    assert model.moe_modules()[1].local_weights.quant == "fp8"
    for e in (0, 7, 15):
        k = lambda proj, s="weight": files[expert_key(1, e, proj, s)]  # noqa: E731
        assert torch.equal(u8(p["w3_w1_weight"][0][e]), u8(torch.cat((k("up_proj"), k("gate_proj")))))
        scales = torch.cat((k("up_proj", "weight_scale_inv"), k("gate_proj", "weight_scale_inv")))
        assert torch.equal(p["w3_w1_weight_scale_inv"][0][e], scales)
        assert torch.equal(u8(p["w2_weight"][0][e]), u8(k("down_proj")))
        assert torch.equal(p["w2_weight_scale_inv"][0][e], k("down_proj", "weight_scale_inv"))
    assert p["w3_w1_weight"][0].shape == (16, 2 * inter, cfg.hidden_size)
    # kv_b is dequantized for the latent-space decode at load, before a KV cache is sized
    kv_b = model.get_submodule("model.layers.1.self_attn.kv_b_proj")
    assert len(kv_b._derived) == 1
    w = dense_weight(kv_b)
    assert len(kv_b._derived) == 1 and torch.equal(
        w, dequantize_weight_blocks(kv_b.weight, kv_b.weight_scale_inv).bfloat16())


def _rewrite(src, dst, change_tensors=None, change_config=None):
    t = _tensors(src)
    hf = _config(src)
    if change_tensors:
        change_tensors(t)
    if change_config:
        change_config(hf)
    write_checkpoint(dst, hf, t, 1 << 20)
    return dst


def _no_weight_read(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a weight was read before the bad tensor was reported")
    monkeypatch.setattr(checkpoint_mod, "load_dense_weights", fail)
    monkeypatch.setattr(checkpoint_mod, "load_moe_experts", fail)


Q_B = "model.layers.0.self_attn.q_b_proj"
EXPERT = "model.layers.1.mlp.experts.5.up_proj"


@pytest.mark.parametrize("change, match", [
    (lambda t: t.pop(Q_B + ".weight_scale_inv"), rf"{Q_B}.weight_scale_inv: missing"),
    (lambda t: t.pop(EXPERT + ".weight_scale_inv"), rf"{EXPERT}.weight_scale_inv: missing"),
    # q_b is [96, 48]: a 64x64 block grid has 2 x 1 scales
    (lambda t: t.__setitem__(Q_B + ".weight_scale_inv", torch.ones(2, 1)),
     rf"{Q_B}.weight_scale_inv: shape \(2, 1\) != \(1, 1\), one scale per 128x128 block"),
    (lambda t: t.__setitem__(EXPERT + ".weight_scale_inv", torch.ones(1, 2)),
     rf"{EXPERT}.weight_scale_inv: shape \(1, 2\) != \(1, 1\)"),
    (lambda t: t.__setitem__(Q_B + ".weight_scale_inv", torch.ones(1, 1, dtype=torch.bfloat16)),
     rf"{Q_B}.weight_scale_inv: dtype torch.bfloat16 in the checkpoint, expected float32"),
    (lambda t: t.__setitem__(Q_B + ".weight", t[Q_B + ".weight"].to(torch.bfloat16)),
     rf"{Q_B}.weight: dtype torch.bfloat16 in the checkpoint, expected float8_e4m3fn"),
    (lambda t: t.__setitem__(EXPERT + ".weight", t[EXPERT + ".weight"].to(torch.bfloat16)),
     rf"{EXPERT}.weight: dtype torch.bfloat16 in the checkpoint, expected float8_e4m3fn"),
    (lambda t: t.__setitem__(Q_B + ".weight", t[Q_B + ".weight"][:, :32].contiguous()),
     rf"{Q_B}.weight: shape \(96, 32\) != expected \(96, 48\)"),
])
def test_bad_tensors_fail_naming_them_before_any_read(ds_ckpt, tmp_path, monkeypatch, change, match):
    bad = _rewrite(ds_ckpt, tmp_path, change_tensors=change)
    _no_weight_read(monkeypatch)
    with pytest.raises((ValueError, KeyError), match=match):
        load_model(bad)


@pytest.mark.parametrize("key, value, match", [
    ("weight_block_size", [64, 64], r"weight_block_size \[64, 64\] is not supported"),
    ("weight_block_size", None, "weight_block_size None"),
    ("fmt", "e5m2", "fmt 'e5m2' is not supported"),
    ("activation_scheme", "static", "activation_scheme 'static' is not supported"),
])
def test_bad_quantization_config_names_the_field(ds_ckpt, tmp_path, key, value, match):
    bad = _rewrite(ds_ckpt, tmp_path,
                   change_config=lambda hf: hf["quantization_config"].__setitem__(key, value))
    with pytest.raises(ValueError, match=match):
        read_config(bad)
    with pytest.raises(ValueError, match=match):
        load_model(bad)


def test_fp8_tensors_without_the_config_are_refused(ds_ckpt, tmp_path, monkeypatch):
    bad = _rewrite(ds_ckpt, tmp_path, change_config=lambda hf: hf.pop("quantization_config"))
    _no_weight_read(monkeypatch)
    with pytest.raises(ValueError, match=r"q_a_proj.weight: dtype torch.float8_e4m3fn in the "
                                         r"checkpoint, expected .*quant_method: fp8"):
        load_model(bad)


def test_modules_to_not_convert_stay_bf16(ds_ckpt, tmp_path):
    o_proj = "model.layers.1.self_attn.o_proj"

    def to_bf16(t):
        t[o_proj + ".weight"] = dequantize_weight_blocks(
            t[o_proj + ".weight"], t.pop(o_proj + ".weight_scale_inv")).to(torch.bfloat16)

    path = _rewrite(ds_ckpt, tmp_path, change_tensors=to_bf16, change_config=lambda hf: hf[
        "quantization_config"].__setitem__("modules_to_not_convert", [o_proj, "lm_head"]))
    model = load_model(path)
    assert type(model.get_submodule(o_proj)) is nn.Linear
    assert isinstance(model.get_submodule("model.layers.0.self_attn.o_proj"), Fp8Linear)


def test_fp8_linear_cpu_is_the_reference_and_decode_weight_is_cached():
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(256, 200, bias=False, dtype=torch.bfloat16))
    assert convert_linears_(model) == ["0"]
    lin = model[0].to_empty(device="cpu")
    q, s = quantize_weight_blocks(torch.randn(200, 256, generator=gen) * 0.05)
    with torch.no_grad():
        lin.weight.copy_(q)
        lin.weight_scale_inv.copy_(s)
    x = torch.randn(2, 3, 256, generator=gen).bfloat16()
    assert lin.gemm_backend(x.device) == "reference"
    assert torch.equal(lin(x), fp8_linear_ref(x, q, s))
    w = dense_weight(lin)
    assert w.dtype == torch.bfloat16 and torch.equal(w, dequantize_weight_blocks(q, s).bfloat16())
    assert dense_weight(lin) is w  # computed once
    with torch.no_grad():
        lin.weight_scale_inv.mul_(2)
    assert torch.equal(dense_weight(lin), (dequantize_weight_blocks(q, s) * 2).bfloat16())


def _cli(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.main(parser.parse_args(argv))


def test_make_checkpoint_refuses_sizes_off_the_block_grid(tmp_path, capsys):
    assert _cli(make_checkpoint, ["--preset", "tiny-deepseek-v3", "--quant", "fp8",
                                  "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "H=64 and I=64 to be multiples of 128" in err and "tiny-*-fp8" in err
    assert not (tmp_path / "x").exists()
    assert _cli(make_checkpoint, ["--preset", QWEN, "--quant", "fp8", "--num-layers", "1",
                                  "--out", str(tmp_path / "y")]) == 0


def test_check_config_reports_fp8_expert_bytes_and_saving(capsys):
    cfg = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "deepseek_v3_dwdp4.yaml")
    assert _cli(check_config, [cfg, "--model", "deepseek-v3", "--quant", "fp8",
                               "--moe-backend", "torch", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["expert_bytes"] == 3 * 7168 * 2048 + (32 * 56 + 56 * 16) * 4
    assert report["expert_bytes_bf16"] == 3 * 7168 * 2048 * 2
    assert _cli(check_config, [cfg, "--model", "deepseek-v3", "--quant", "fp8",
                               "--moe-backend", "torch"]) == 0
    assert "experts fp8: 42.01 MiB per expert (weights and scales) vs 84.00 MiB in bf16: 50.0% less" \
        in capsys.readouterr().out
    # the config's cutedsl backend keeps FP8 experts linear (its FP8 kernel reads checkpoint rows)
    assert _cli(check_config, [cfg, "--model", "deepseek-v3", "--quant", "fp8"]) == 0
    assert "linear layout for MoE backend cutedsl" in capsys.readouterr().out
    assert _cli(check_config, [cfg, "--model", "deepseek-v3", "--quant", "fp8",
                               "--weight-layout", "preshuffled"]) == 1
    assert "FP8 experts stay linear" in capsys.readouterr().err


def test_modules_to_not_convert_matching():
    """Exact names, parents and globs (published configs use all three); lm_head never."""
    with torch.device("meta"):
        model = nn.ModuleDict({
            "lm_head": nn.Linear(8, 8),
            "layers": nn.ModuleList([nn.ModuleDict({"self_attn": nn.ModuleDict({
                "o_proj": nn.Linear(8, 8)}), "mlp": nn.ModuleDict({"up_proj": nn.Linear(8, 8),
                                                                    "gate_proj": nn.Linear(8, 8)})})
                for _ in range(2)]),
        })
    got = convert_linears_(model, ("layers.*.self_attn", "layers.1.mlp.gate_proj"))
    assert got == ["layers.0.mlp.up_proj", "layers.0.mlp.gate_proj", "layers.1.mlp.up_proj"]
    assert type(model["lm_head"]) is nn.Linear
    assert isinstance(model["layers"][1]["mlp"]["up_proj"], Fp8Linear)
    assert type(model["layers"][1]["mlp"]["gate_proj"]) is nn.Linear


@pytest.mark.parametrize("tokens", [1, 3, 16, 17])
def test_quantize_rows_pads_to_the_gemm_alignment(tokens):
    """The vendor GEMM's input: the recipe's bits on the real rows, zero codes and unit scales
    on the pad rows up to a multiple of 16, scales outer-dim-major."""
    from tensorrt_llm_dwdp.model.fp8_linear import M_ALIGN, quantize_rows
    from tensorrt_llm_dwdp.quant.fp8 import quantize_act_per_token

    x = torch.randn(tokens, 384, generator=torch.Generator().manual_seed(tokens)).bfloat16()
    rows = quantize_rows(x)
    pad = -(-tokens // M_ALIGN) * M_ALIGN
    q, s = quantize_act_per_token(x)
    assert rows.rows == tokens and rows.q.shape == (pad, 384) and rows.scale.shape == (pad, 3)
    assert rows.scale.stride() == (1, pad)
    assert torch.equal(rows.q[:tokens].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(rows.scale[:tokens], s)
    assert not rows.q[tokens:].view(torch.uint8).any()
    assert torch.all(rows.scale[tokens:] == 1.0)
