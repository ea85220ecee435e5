"""`python -m tensorrt_llm_dwdp check-config`: resolved layout per rank, clear errors."""
import json
import subprocess
import sys
import textwrap

import pytest

from tensorrt_llm_dwdp.cli import main


def _yaml(tmp_path, body):
    path = tmp_path / "opts.yaml"
    path.write_text(textwrap.dedent(body))
    return str(path)


GOOD = """
    enable_attention_dp: true
    dwdp_config:
      dwdp_size: 4
      num_groups: 2
      num_experts_per_worker: 100
      num_prefetch_experts: 52
"""


def test_text_report_with_model_preset(tmp_path, capsys):
    assert main(["check-config", _yaml(tmp_path, GOOD), "--model", "deepseek-v3",
                 "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "E=256 S=4 W=100 P=52 groups=2" in out
    assert "[[0, 1, 2, 3], [4, 5, 6, 7]]" in out
    assert ("rank 2: owns [104, 204); fetches [0, 52) head of rank 0, [52, 104) head of rank 1, "
            "[204, 256) tail of rank 3") in out
    assert "6112 expert slots for 58 MoE layer(s) vs 14848 replicated (41.2%)" in out
    assert "GiB" in out


def test_json_report_defaults_e_and_bytes(tmp_path, capsys):
    path = _yaml(tmp_path, "dwdp_config: {dwdp_size: 2, num_experts_per_worker: 5, "
                           "num_prefetch_experts: 3}\n")
    assert main(["check-config", path, "--json", "--expert-bytes", "10", "--num-layers", "4"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["num_experts"] == 8 and rep["moe_layers"] == 4
    r0, r1 = rep["ranks"]
    assert r0["owns"] == [0, 5] and r0["fetches"] == [{"peer": 1, "experts": [5, 8], "part": "tail"}]
    assert r1["owns"] == [3, 8] and r1["fetches"] == [{"peer": 0, "experts": [0, 3], "part": "head"}]
    assert r0["expert_slots"] == 4 * 5 + 2 * 3 and r0["replicated_slots"] == 32
    assert r0["bytes"] == 260 and r0["replicated_bytes"] == 320


@pytest.mark.parametrize("body, extra, words", [
    (GOOD, ["--num-experts", "200"], ["= 256", "200 experts"]),
    (GOOD, ["--world-size", "4"], ["world size 4", "4 * 2 = 8"]),
    ("dwdp_config: {dwdp_size: 0}\n", [], ["dwdp_size", ">= 1"]),
    ("dwdp_config: {dwdp_size: 2, num_experts_per_worker: 4, num_prefetch_experts: 4, foo: 1}\n",
     [], ["unknown key", "foo"]),
    ("dwdp_config: {dwdp_size: 1}\n", [], ["--num-experts"]),
    (GOOD, ["--model", "nope"], ["unknown --model 'nope'", "deepseek-v3"]),
    (GOOD, ["--num-layers", "0"], ["--num-layers must be >= 1, got 0"]),  # was taken as "unset"
    (GOOD, ["--num-experts", "0"], ["num_experts must be a positive integer, got 0"]),
])
def test_bad_inputs_exit_nonzero_with_message(tmp_path, capsys, body, extra, words):
    assert main(["check-config", _yaml(tmp_path, body), *extra]) == 1
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err


def test_disabled_config_with_num_experts(tmp_path, capsys):
    assert main(["check-config", _yaml(tmp_path, "x: 1\n"), "--num-experts", "16"]) == 0
    out = capsys.readouterr().out
    assert "DWDP off" in out and "rank 0: owns [0, 16); fetches nothing" in out


def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tensorrt_llm_dwdp", "check-config",
                           _yaml(tmp_path, "dwdp_config: {dwdp_size: -1}\n")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "dwdp_size" in proc.stderr


def test_composite_view_footprint_and_bad_page(tmp_path, capsys):
    path = _yaml(tmp_path, GOOD.replace("num_prefetch_experts: 52",
                                        "num_prefetch_experts: 52\n      expert_view: composite"))
    assert main(["check-config", path, "--model", "deepseek-v3", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["expert_view"] == "composite"
    for entry in rep["ranks"]:
        comp = entry["composite"]
        assert comp["page_bytes"] == 2 << 20
        # own allocations cover the own experts plus at most two pages per layer and tensor
        assert 0 < comp["own_bytes"] - 58 * 100 * (entry["bytes"] // 6112) <= 58 * 6 * 2 * (2 << 20)
        assert 0 < comp["overhead_bytes"] < 0.01 * comp["multi_bytes"]
        assert comp["edge_bytes"] > 0 and comp["reserved_bytes"] >= 2 * 58 * 256 * (
            entry["bytes"] // 6112)
    assert main(["check-config", path, "--model", "deepseek-v3", "--page-bytes", "4096"]) == 0
    assert "composite view (pages of 4 KiB)" in capsys.readouterr().out
    assert main(["check-config", path, "--model", "deepseek-v3", "--page-bytes", "3000"]) == 1
    assert "--page-bytes 3000 is not a power of two" in capsys.readouterr().err
    assert main(["check-config", path, "--num-experts", "256"]) == 0
    assert "pass --model PRESET" in capsys.readouterr().out


def test_host_tiers_report_store_size_and_hbm(tmp_path, capsys):
    path = _yaml(tmp_path, "dwdp_config: {dwdp_size: 2, num_experts_per_worker: 5, "
                           "num_prefetch_experts: 3, host_backup: true, "
                           "host_experts_per_worker: 2}\n")
    assert main(["check-config", path, "--json", "--expert-bytes", "4096", "--num-layers", "4"]) == 0
    rep = json.loads(capsys.readouterr().out)
    r0 = rep["ranks"][0]
    assert r0["host_experts"] == [3, 5]
    assert r0["expert_slots"] == 4 * (5 - 2) + 2 * (3 + 2)  # resident + buffers (peer + own host)
    tiers = rep["host_tiers"]
    assert tiers["host_store_slots"] == 4 * 8
    assert tiers["host_store_bytes"] == 4 * 8 * 4096  # page-aligned regions, nothing wasted here
    assert set(tiers["this_host"]) == {"shm_free", "mem_available"}
    assert main(["check-config", path, "--model", "deepseek-v3", "--num-experts", "8"]) == 0
    out = capsys.readouterr().out
    assert "rank 1: owns [3, 8); experts [6, 8) in host memory" in out
    assert "host store (one per group per node, POSIX shm): 464 expert slots" in out
    assert "GiB free in /dev/shm" in out


def test_composite_offload_footprint_and_uvm_refused(tmp_path, capsys):
    path = _yaml(tmp_path, "dwdp_config: {dwdp_size: 2, num_experts_per_worker: 128, "
                           "num_prefetch_experts: 128, host_experts_per_worker: 32}\n")
    assert main(["check-config", path, "--model", "deepseek-v3", "--json",
                 "--expert-view", "composite"]) == 0
    comp = json.loads(capsys.readouterr().out)["ranks"][0]["composite"]
    # the own allocations hold the 96 resident experts (+ edges and rounding), the pools the
    # peer's 128 and the own 32 per buffer, against the multi view's slots of the same bytes
    assert 0 <= comp["overhead_bytes"] < 0.01 * comp["multi_bytes"]
    per_layer_own, per_buffer_pool = comp["own_bytes"] / 58, comp["pool_bytes"] / 2
    assert 0.595 < per_layer_own / per_buffer_pool < 0.605  # 96 / 160 experts
    uvm = _yaml(tmp_path, "dwdp_config: {dwdp_size: 2, num_experts_per_worker: 128, "
                          "num_prefetch_experts: 128, host_experts_per_worker: 32, "
                          "host_offload: uvm, expert_view: multi}\n")
    assert main(["check-config", uvm, "--num-experts", "256"]) == 0
    capsys.readouterr()
    assert main(["check-config", uvm, "--num-experts", "256", "--expert-view", "composite"]) == 1
    assert "host_offload: uvm does not combine with expert_view: composite" in \
        capsys.readouterr().err
