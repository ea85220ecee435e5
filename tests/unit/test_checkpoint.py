"""Checkpoint loading: round trips, NVFP4 conversion bit for bit, global-scale sharing, errors."""
import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file

from tensorrt_llm_dwdp.cli.commands import make_checkpoint
from tensorrt_llm_dwdp.model.checkpoint import load_model, read_config
from tensorrt_llm_dwdp.model.expert_convert import share_global_scale
from tensorrt_llm_dwdp.model.hf_names import NVFP4, expert_key, hf_quant_config
from tensorrt_llm_dwdp.model.presets import get_preset
from tensorrt_llm_dwdp.model.safetensors_io import INDEX_FILE, CheckpointReader
from tensorrt_llm_dwdp.model.synthetic import quantize_experts_modelopt
from tensorrt_llm_dwdp.quant.nvfp4 import dequantize_nvfp4, global_scale_from_amax, quantize_nvfp4

from _model_oracle_utils import random_hf_checkpoint, write_checkpoint


def _make(tmp_path, preset, quant, *extra):
    parser = __import__("argparse").ArgumentParser()
    make_checkpoint.add_arguments(parser)
    args = parser.parse_args(["--preset", preset, "--quant", quant, "--out", str(tmp_path), *extra])
    assert make_checkpoint.main(args) == 0
    return tmp_path


def _all_tensors(path):
    out = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


@pytest.mark.parametrize("quant", ["bf16", NVFP4])
@pytest.mark.parametrize("preset", ["tiny-deepseek-v3", "tiny-qwen3-moe"])
def test_make_checkpoint_round_trip(tmp_path, preset, quant):
    _make(tmp_path, preset, quant, "--num-layers", "2", "--shard-size-gb", "0.0001", "--seed", "5")
    assert os.path.isfile(tmp_path / INDEX_FILE)  # small shards: the index path is exercised
    cfg, q = read_config(tmp_path)
    assert q == quant and cfg.num_layers == 2
    files = _all_tensors(tmp_path)
    model = load_model(tmp_path)
    for name, t in model.state_dict().items():
        key = name.replace(".mlp.experts.gate.", ".mlp.gate.")
        assert torch.equal(t, files[key].to(t.dtype)), name
    inter = cfg.moe_intermediate_size
    for layer, moe in model.moe_modules().items():
        p = moe.local_weights.tensors
        for e in range(cfg.num_experts):
            if quant == "bf16":
                up, gate = files[expert_key(layer, e, "up_proj")], files[expert_key(layer, e, "gate_proj")]
                assert torch.equal(p["w3_w1_weight"][0][e], torch.cat((up, gate)))
                assert torch.equal(p["w2_weight"][0][e], files[expert_key(layer, e, "down_proj")])
            else:
                # synthetic NVFP4 shares one weight_scale_2 per tensor kind, so no rescaling
                k = lambda proj, s: files[expert_key(layer, e, proj, s)]  # noqa: E731
                assert torch.equal(p["w3_w1_weight"][0][e, :inter], k("up_proj", "weight"))
                assert torch.equal(p["w3_w1_weight"][0][e, inter:], k("gate_proj", "weight"))
                assert torch.equal(p["w3_w1_weight_scale"][0][e, inter:].view(torch.uint8),
                                   k("gate_proj", "weight_scale").view(torch.uint8))
                assert p["fc31_alpha"][0][e] == k("gate_proj", "weight_scale_2")
                assert torch.equal(p["w2_weight"][0][e], k("down_proj", "weight"))
                assert p["fc2_alpha"][0][e] == k("down_proj", "weight_scale_2")
    tok = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "DwdpByteTokenizer" and tok["vocab_size"] == cfg.vocab_size


def test_nvfp4_load_equals_quantize_of_original_bitwise(tmp_path):
    hf = get_preset("tiny-qwen3-moe", num_layers=2)
    original = random_hf_checkpoint(hf, seed=11)
    write_checkpoint(tmp_path, hf, quantize_experts_modelopt(original), 1 << 20, hf_quant_config(NVFP4))
    model = load_model(tmp_path)
    cfg, _ = read_config(tmp_path)
    for layer, moe in model.moe_modules().items():
        p = moe.local_weights.tensors
        for e in range(cfg.num_experts):
            up, gate, down = (original[expert_key(layer, e, x)] for x in ("up_proj", "gate_proj", "down_proj"))
            w13 = torch.cat((up, gate))
            q13 = quantize_nvfp4(w13, global_scale_from_amax(w13.abs().amax()))
            q2 = quantize_nvfp4(down)
            assert torch.equal(p["w3_w1_weight"][0][e], q13.packed)
            assert torch.equal(p["w3_w1_weight_scale"][0][e].view(torch.uint8), q13.scale.view(torch.uint8))
            assert torch.equal(p["fc31_alpha"][0][e], q13.global_scale)
            assert torch.equal(p["w2_weight"][0][e], q2.packed)
            assert torch.equal(p["w2_weight_scale"][0][e].view(torch.uint8), q2.scale.view(torch.uint8))
            assert torch.equal(p["fc2_alpha"][0][e], q2.global_scale)


def _q(w, g):
    q = quantize_nvfp4(w, g)
    return q.packed, q.scale, q.global_scale


def test_share_global_scale_exact_rescale_and_lossy_requantize(caplog):
    g = torch.Generator().manual_seed(0)
    up_w, gate_w = torch.randn(8, 32, generator=g), torch.randn(8, 32, generator=g)
    # equal scales: passed through untouched
    up, gate = _q(up_w, 0.01), _q(gate_w, 0.01)
    res = share_global_scale(up, gate)
    assert res[0] is up[0] and res[3] is gate[1] and res[4] == torch.tensor(0.01)
    # ratio 1/4 with block scales <= 112: rescaling by 1/4 is exact in e4m3
    up, gate = _q(up_w, 0.04), _q(gate_w, 0.01)
    with caplog.at_level(logging.WARNING):
        up_p, up_s, gate_p, gate_s, shared = share_global_scale(up, gate, "L0 E0")
    assert not caplog.records and shared == torch.tensor(0.04)
    assert torch.equal(gate_p, gate[0])
    assert torch.equal(dequantize_nvfp4(gate_p, gate_s, shared), dequantize_nvfp4(gate[0], gate[1], gate[2]))
    # ratio 0.7: not representable -> re-quantized with a warning, values still close
    up, gate = _q(up_w, 0.01), _q(gate_w, 0.007)
    with caplog.at_level(logging.WARNING):
        up_p, up_s, gate_p, gate_s, shared = share_global_scale(up, gate, "L3 E5")
    assert "L3 E5 gate_proj" in caplog.text and shared == torch.tensor(0.01)
    assert torch.equal(up_p, up[0]) and torch.equal(up_s.view(torch.uint8), up[1].view(torch.uint8))
    before = dequantize_nvfp4(gate[0], gate[1], gate[2])
    after = dequantize_nvfp4(gate_p, gate_s, shared)
    assert (after - before).abs().max() <= 0.25 * before.abs().max()


def _tiny(tmp_path, **overrides):
    hf = get_preset("tiny-qwen3-moe", num_layers=2, overrides=overrides)
    sd = random_hf_checkpoint(hf, seed=1)
    return hf, sd


def test_missing_key_names_it(tmp_path):
    hf, sd = _tiny(tmp_path)
    del sd[expert_key(1, 5, "up_proj")]
    write_checkpoint(tmp_path, hf, sd, 1 << 20)
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight"):
        load_model(tmp_path)


def test_missing_dense_key_names_it(tmp_path):
    hf, sd = _tiny(tmp_path)
    del sd["model.layers.0.self_attn.k_norm.weight"]
    write_checkpoint(tmp_path, hf, sd, 1 << 20)
    with pytest.raises(KeyError, match="k_norm"):
        load_model(tmp_path)


def test_bad_shapes_name_the_key(tmp_path):
    hf, sd = _tiny(tmp_path)
    sd[expert_key(0, 2, "down_proj")] = sd[expert_key(0, 2, "down_proj")][:, :16].contiguous()
    write_checkpoint(tmp_path, hf, sd, 1 << 20)
    with pytest.raises(ValueError, match=r"experts\.2\.down_proj\.weight: shape \(64, 16\)"):
        load_model(tmp_path)
    hf, sd = _tiny(tmp_path)
    sd["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(3, 3, dtype=torch.bfloat16)
    write_checkpoint(tmp_path, hf, sd, 1 << 20)
    with pytest.raises(ValueError, match="q_proj.weight: shape"):
        load_model(tmp_path)


def test_bad_nvfp4_tensors(tmp_path):
    hf, sd = _tiny(tmp_path)
    q = quantize_experts_modelopt(sd)
    q[expert_key(1, 0, "gate_proj", "weight_scale_2")] = torch.tensor(-1.0)
    write_checkpoint(tmp_path, hf, q, 1 << 20, hf_quant_config(NVFP4))
    with pytest.raises(ValueError, match=r"experts\.0\.gate_proj\.weight_scale_2: must be finite and > 0"):
        load_model(tmp_path)
    q = quantize_experts_modelopt(sd)
    q[expert_key(0, 3, "up_proj", "weight_scale")] = q[expert_key(0, 3, "up_proj", "weight_scale")].float()
    write_checkpoint(tmp_path, hf, q, 1 << 20, hf_quant_config(NVFP4))
    with pytest.raises(ValueError, match=r"experts\.3\.up_proj\.weight_scale: dtype"):
        load_model(tmp_path)


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    hf, sd = _tiny(tmp_path)
    write_checkpoint(tmp_path, {**hf, "architectures": ["MixtralForCausalLM"]}, sd, 1 << 20)
    with pytest.raises(ValueError, match="MixtralForCausalLM"):
        load_model(tmp_path)
    write_checkpoint(tmp_path, {**hf, "quantization_config": {"quant_algo": "FP8"}}, sd, 1 << 20)
    with pytest.raises(ValueError, match="FP8"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        CheckpointReader(tmp_path)


def test_missing_shard_is_reported(tmp_path):
    hf, sd = _tiny(tmp_path)
    write_checkpoint(tmp_path, hf, sd, 16 << 10)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / victim).unlink()
    with pytest.raises(FileNotFoundError, match=victim):
        load_model(tmp_path)


def test_nvfp4_non_expert_linear_is_dequantized(tmp_path):
    hf, sd = _tiny(tmp_path)
    key = "model.layers.1.self_attn.o_proj.weight"
    q = quantize_nvfp4(sd.pop(key))
    sd.update({key: q.packed, key + "_scale": q.scale, key + "_scale_2": q.global_scale.reshape(())})
    write_checkpoint(tmp_path, hf, sd, 1 << 20)
    model = load_model(tmp_path)
    want = dequantize_nvfp4(q.packed, q.scale, q.global_scale).to(torch.bfloat16)
    assert torch.equal(model.state_dict()[key], want)
    del sd[key + "_scale"]
    write_checkpoint(tmp_path, hf, sd, 1 << 20)
    with pytest.raises(ValueError, match="o_proj.weight is uint8"):
        load_model(tmp_path)


def test_reader_rows_and_truncation(tmp_path):
    t = torch.arange(6 * 5, dtype=torch.float32).view(6, 5)
    write_checkpoint(tmp_path, get_preset("tiny-qwen3-moe"), {"x": t, "s": torch.tensor(3.0)}, 1 << 20)
    with CheckpointReader(tmp_path) as r:
        assert torch.equal(r.get_rows("x", 2, 5), t[2:5]) and r.bytes_read == 3 * 5 * 4
        assert r.get("s") == 3.0 and r.shape("x") == (6, 5)
        with pytest.raises(IndexError, match=r"rows \[4, 7\)"):
            r.get_rows("x", 4, 7)
        with pytest.raises(KeyError, match="'y'"):
            r.get("y")
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(ValueError, match="does not fit"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int32])
def test_dense_tensor_of_a_non_float_dtype_names_key_and_dtype(tmp_path, dtype):
    """An fp8 (block-scaled) or integer dense weight must not be cast to bf16 without its scales."""
    hf, sd = _tiny(tmp_path)
    key = "model.layers.1.self_attn.q_proj.weight"
    sd[key] = sd[key].float().clamp(-1, 1).to(dtype)
    write_checkpoint(tmp_path, hf, sd, 1 << 20)
    with pytest.raises(ValueError, match=rf"q_proj\.weight: dtype {dtype} in the checkpoint, "
                                         r"expected torch.bfloat16"):
        load_model(tmp_path)
