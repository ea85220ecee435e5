"""examples/disaggregated: submit.py outputs parse and validate; the shell scripts are valid bash."""
import importlib.util
import json
import os
import sys
import subprocess

import pytest
import yaml

from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.serve.disagg_config import load_disagg_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples", "disaggregated")


def _submit():
    spec = importlib.util.spec_from_file_location("dwdp_submit", os.path.join(EXAMPLES, "submit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", ["start_worker_dwdp.sh", "launch_local.sh"])
def test_shell_scripts_parse(script):
    path = os.path.join(EXAMPLES, script)
    assert os.access(path, os.X_OK)
    subprocess.run(["bash", "-n", path], check=True)


@pytest.mark.parametrize("size,groups,w,p,gen,gpn,nodes", [
    (2, 1, 128, 128, 1, 8, 2),
    (4, 2, 100, 52, 3, 4, 3),
    (8, 1, 32, 32, 9, 8, 3),
])
def test_submit_writes_valid_job(tmp_path, size, groups, w, p, gen, gpn, nodes):
    submit = _submit()
    out = tmp_path / "job"
    rc = submit.main(["--model", "/ckpt/dsv3", "--num-experts", "256", "--dwdp-size", str(size),
                      "--num-groups", str(groups), "--experts-per-worker", str(w),
                      "--num-prefetch-experts", str(p), "--num-gen-servers", str(gen),
                      "--gpus-per-node", str(gpn), "--out-dir", str(out)])
    assert rc == 0
    cfg = DwdpConfig.from_yaml(out / "ctx_options.yaml")
    cfg.check_num_experts(256)
    cfg.check_world_size(size * groups)
    hosts = [f"gpu-node-{i:02d}" for i in range(nodes)]
    rc = submit.main(["render", "--template", str(out / "disagg_template.yaml"), "--hosts", *hosts,
                      "--out", str(out / "disagg.yaml")])
    assert rc == 0
    disagg = load_disagg_config(str(out / "disagg.yaml"))
    assert len(disagg.context.instances) == size * groups and len(disagg.generation.instances) == gen
    assert disagg.hostname == hosts[0]
    # Every DWDP group sits on one node.
    for g in range(groups):
        members = disagg.context.instances[g * size:(g + 1) * size]
        assert len({m.hostname for m in members}) == 1
    assert {i.hostname for i in disagg.generation.instances} <= set(hosts[-((gen + gpn - 1) // gpn):])
    opts = disagg.serve_options(disagg.context.instances[0])
    assert opts.dwdp_config == cfg and opts.moe_backend == "cutedsl"
    script = (out / "job.slurm").read_text()
    assert f"#SBATCH --nodes={nodes}" in script and "start_worker_dwdp.sh" in script
    assert "NCCL_NVLS_ENABLE=0" in script
    subprocess.run(["bash", "-n", str(out / "job.slurm")], check=True)
    with pytest.raises(ValueError, match="allocation has 1 node"):
        submit.render(yaml.safe_load((out / "disagg_template.yaml").read_text()), hosts[:1])


@pytest.mark.parametrize("flags,match", [
    (["--dwdp-size", "3", "--experts-per-worker", "86", "--num-prefetch-experts", "85"], "must divide"),
    (["--dwdp-size", "4", "--experts-per-worker", "64", "--num-prefetch-experts", "60"], "does not cover"),
])
def test_submit_rejects_bad_layouts_before_writing(tmp_path, capsys, flags, match):
    out = tmp_path / "job"
    rc = _submit().main(["--model", "/ckpt", "--num-experts", "256", "--out-dir", str(out), *flags])
    assert rc == 2 and match in capsys.readouterr().err and not out.exists()


def test_launch_local_refuses_a_port_in_use_before_starting(tmp_path):
    """Worker ports are --port + 1, + 2, ...: one held by another process (an outgoing
    connection can sit on any of them) stops the launch at once, naming it; it used to start,
    and the router waited 300 s for a server that could not bind."""
    import socket

    from tensorrt_llm_dwdp.launcher import free_port_block

    ctx = tmp_path / "ctx.yaml"
    ctx.write_text(yaml.safe_dump({"max_seq_len": 512, "dwdp_config": {
        "dwdp_size": 2, "num_experts_per_worker": 8, "num_prefetch_experts": 8}}))
    port = free_port_block(4)
    with socket.socket() as held:
        held.bind(("127.0.0.1", port + 2))
        held.listen(1)
        proc = subprocess.run([os.path.join(EXAMPLES, "launch_local.sh"), str(tmp_path / "m"),
                               str(ctx), "--port", str(port), "--device", "cpu",
                               "--workdir", str(tmp_path / "work")],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port + 2}" in proc.stderr, proc.stderr[-2000:]
    assert "start_worker_dwdp" not in proc.stderr  # nothing was started


@pytest.mark.slow
@pytest.mark.multirank
def test_launch_local_smoke(tmp_path):
    """launch_local.sh brings up context group + generation server + router, answers, cleans up."""
    from tensorrt_llm_dwdp.launcher import free_port_block
    from tensorrt_llm_dwdp.model.presets import get_preset
    from tensorrt_llm_dwdp.model.synthetic import write_synthetic_checkpoint

    model = tmp_path / "tiny"
    write_synthetic_checkpoint(str(model), get_preset("tiny-deepseek-v3", num_layers=2), quant="nvfp4")
    ctx = tmp_path / "ctx.yaml"
    ctx.write_text(yaml.safe_dump({"max_seq_len": 512, "max_batch_size": 2, "moe_config": {"backend": "VANILLA"},
                                   "dwdp_config": {"dwdp_size": 2, "num_experts_per_worker": 8,
                                                   "num_prefetch_experts": 8}}))
    port = free_port_block(4)  # router, 2 context ranks, 1 generation server
    proc = subprocess.run([os.path.join(EXAMPLES, "launch_local.sh"), str(model), str(ctx), "--port", str(port),
                           "--device", "cpu", "--workdir", str(tmp_path / "work"), "--smoke", "--timeout", "300"],
                          capture_output=True, text=True, timeout=420,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["usage"]["completion_tokens"] == 8
    disagg = load_disagg_config(str(tmp_path / "work" / "disagg.yaml"))
    assert len(disagg.context.instances) == 2 and disagg.port == port
    # Nothing is left listening: every port of the deployment can be bound again (SO_REUSEADDR
    # lets closed connections in TIME_WAIT pass, never a live listener).
    import socket
    for inst in disagg.instances:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", inst.port))
