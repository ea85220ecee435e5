#!/usr/bin/env python3
"""Write the YAMLs and the Slurm script of a multi-node disaggregated DWDP deployment.

    python examples/disaggregated/submit.py --model /ckpt/DeepSeek-V3 --num-experts 256 \\
        --dwdp-size 4 --num-groups 2 --experts-per-worker 64 --num-prefetch-experts 64 \\
        --num-gen-servers 2 --gpus-per-node 8 --out-dir jobs/dsv3 [--submit]

Layout: the ``dwdp_size * num_groups`` context ranks fill whole nodes first (a DWDP group never
spans nodes: its ranks share experts through CUDA IPC over NVLink), then one GPU per generation
server. Hostnames are known only inside the allocation, so ``disagg_template.yaml`` names nodes
``NODE_<i>``; the Slurm script resolves them with ``submit.py render`` and then runs the context
ranks and the generation servers with ``srun ... start_worker_dwdp.sh`` and the router on the
first node. Outputs: ctx_options.yaml, gen_options.yaml, disagg_template.yaml, job.slurm.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
from typing import Any, Sequence

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
NODE = "NODE_{}"


def build_layout(args: argparse.Namespace) -> dict[str, Any]:
    """Nodes and ports of every server; raises ValueError naming the argument at fault."""
    size, groups, gpn = args.dwdp_size, args.num_groups, args.gpus_per_node
    if size > gpn or gpn % size:
        raise ValueError(f"--dwdp-size {size} must divide --gpus-per-node {gpn}: a DWDP group must "
                         f"stay inside one node's NVLink domain")
    num_ctx = size * groups
    ctx_nodes = math.ceil(num_ctx / gpn)
    gen_nodes = math.ceil(args.num_gen_servers / gpn)
    ctx = [(r // gpn, args.worker_port + r % gpn) for r in range(num_ctx)]
    gen = [(ctx_nodes + g // gpn, args.worker_port + g % gpn) for g in range(args.num_gen_servers)]
    return {"num_ctx": num_ctx, "ctx_nodes": ctx_nodes, "gen_nodes": gen_nodes,
            "num_nodes": ctx_nodes + gen_nodes, "ctx": ctx, "gen": gen}


def ctx_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_batch_size": args.ctx_max_batch_size,
        "max_num_tokens": args.ctx_max_num_tokens,
        "max_seq_len": args.max_seq_len,
        "disable_overlap_scheduler": True,
        "moe_config": {"backend": args.moe_backend},
        "dwdp_config": {
            "dwdp_size": args.dwdp_size,
            "num_groups": args.num_groups,
            "num_experts_per_worker": args.experts_per_worker,
            "num_prefetch_experts": args.num_prefetch_experts,
            "contention_opt": args.contention_opt,
        },
    }


def gen_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_batch_size": args.gen_max_batch_size, "max_num_tokens": args.gen_max_num_tokens,
            "max_seq_len": args.max_seq_len, "moe_config": {"backend": args.moe_backend}}


def disagg_template(args: argparse.Namespace, layout: dict[str, Any]) -> dict[str, Any]:
    return {
        "hostname": NODE.format(0), "port": args.router_port, "model": args.model, "backend": "pytorch",
        "context_servers": {"num_instances": layout["num_ctx"],
                            "urls": [f"{NODE.format(n)}:{p}" for n, p in layout["ctx"]], **ctx_options(args)},
        "generation_servers": {"num_instances": len(layout["gen"]),
                               "urls": [f"{NODE.format(n)}:{p}" for n, p in layout["gen"]], **gen_options(args)},
    }


def render(template: dict[str, Any], hosts: Sequence[str]) -> dict[str, Any]:
    """Replace ``NODE_<i>`` by the i-th hostname of the allocation."""
    def host(name: str) -> str:
        if not name.startswith("NODE_"):
            return name
        i = int(name[5:])
        if i >= len(hosts):
            raise ValueError(f"template names {name} but the allocation has {len(hosts)} node(s)")
        return hosts[i]

    out = json.loads(json.dumps(template))
    out["hostname"] = host(out["hostname"])
    for role in ("context_servers", "generation_servers"):
        out[role]["urls"] = [f"{host(u.rsplit(':', 1)[0])}:{u.rsplit(':', 1)[1]}" for u in out[role]["urls"]]
    return out


def slurm_script(args: argparse.Namespace, layout: dict[str, Any], out_dir: str) -> str:
    q = shlex.quote
    worker = os.path.join(HERE, "start_worker_dwdp.sh")
    gpn, num_ctx, num_gen = args.gpus_per_node, layout["num_ctx"], len(layout["gen"])
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={args.job_name}",
        f"#SBATCH --nodes={layout['num_nodes']}",
        f"#SBATCH --ntasks-per-node={gpn}",
        f"#SBATCH --gpus-per-node={gpn}",
        f"#SBATCH --time={args.time}",
        f"#SBATCH --output={os.path.join(out_dir, 'slurm-%j.out')}",
    ]
    if args.partition:
        lines.append(f"#SBATCH --partition={args.partition}")
    if args.account:
        lines.append(f"#SBATCH --account={args.account}")
    lines += [
        "set -euo pipefail",
        "export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1",
        f"out={q(out_dir)}",
        'mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        f"python3 {q(os.path.abspath(__file__))} render --template \"$out/disagg_template.yaml\" "
        "--hosts \"${nodes[@]}\" --out \"$out/disagg.yaml\"",
        f"ctx_nodes=$(IFS=,; echo \"${{nodes[*]:0:{layout['ctx_nodes']}}}\")",
        f"gen_nodes=$(IFS=,; echo \"${{nodes[*]:{layout['ctx_nodes']}:{layout['gen_nodes']}}}\")",
        f"srun --mpi=pmix --nodelist=\"$ctx_nodes\" --nodes={layout['ctx_nodes']} --ntasks={num_ctx} "
        f"--ntasks-per-node={min(gpn, num_ctx)} {q(worker)} \"$out/disagg.yaml\" context \"$out/logs\" &",
        f"srun --mpi=pmix --nodelist=\"$gen_nodes\" --nodes={layout['gen_nodes']} --ntasks={num_gen} "
        f"--ntasks-per-node={min(gpn, num_gen)} {q(worker)} \"$out/disagg.yaml\" generation \"$out/logs\" &",
        "srun --nodelist=\"${nodes[0]}\" --nodes=1 --ntasks=1 --overlap "
        "python3 -m tensorrt_llm_dwdp disaggregated -c \"$out/disagg.yaml\" "
        f"-t {args.server_start_timeout} >\"$out/logs/router.log\" 2>&1 &",
        "wait",
    ]
    return "\n".join(lines) + "\n"


def write_job(args: argparse.Namespace) -> dict[str, str]:
    layout = build_layout(args)
    out = os.path.abspath(args.out_dir)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    files = {
        "ctx_options.yaml": yaml.safe_dump(ctx_options(args), sort_keys=False),
        "gen_options.yaml": yaml.safe_dump(gen_options(args), sort_keys=False),
        "disagg_template.yaml": yaml.safe_dump(disagg_template(args, layout), sort_keys=False),
        "job.slurm": slurm_script(args, layout, out),
    }
    paths = {}
    for name, text in files.items():
        paths[name] = os.path.join(out, name)
        with open(paths[name], "w", encoding="utf-8") as f:
            f.write(text)
    os.chmod(paths["job.slurm"], 0o755)
    return paths


def validate(args: argparse.Namespace) -> None:
    """Check the job as the servers will (DWDP layout, option keys, the config with real
    hostnames) before anything is written; raises ValueError naming what is wrong."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
    from tensorrt_llm_dwdp.serve.disagg_config import parse_disagg_config

    layout = build_layout(args)
    cfg = DwdpConfig.from_dict(ctx_options(args)["dwdp_config"])
    if args.num_experts is not None:
        cfg.check_num_experts(args.num_experts)
    cfg.check_world_size(layout["num_ctx"])
    hosts = [f"node{i}" for i in range(layout["num_nodes"])]
    parse_disagg_config(render(disagg_template(args, layout), hosts), source="rendered template")


def _num_experts_from_model(model: str) -> int | None:
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        hf = json.load(f)
    return hf.get("n_routed_experts") or hf.get("num_experts")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--num-experts", type=int, default=None, help="routed experts E (default: from config.json)")
    p.add_argument("--dwdp-size", type=int, required=True)
    p.add_argument("--num-groups", type=int, default=1)
    p.add_argument("--experts-per-worker", type=int, required=True, help="W")
    p.add_argument("--num-prefetch-experts", type=int, required=True, help="P")
    p.add_argument("--contention-opt", action="store_true", help="interleaved 2 MiB slice copy plan")
    p.add_argument("--num-gen-servers", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--moe-backend", default="CUTEDSL", choices=("CUTEDSL", "VANILLA"))
    p.add_argument("--ctx-max-batch-size", type=int, default=8)
    p.add_argument("--ctx-max-num-tokens", type=int, default=16384)
    p.add_argument("--gen-max-batch-size", type=int, default=64)
    p.add_argument("--gen-max-num-tokens", type=int, default=4096)
    p.add_argument("--max-seq-len", type=int, default=8192)
    p.add_argument("--router-port", type=int, default=8000)
    p.add_argument("--worker-port", type=int, default=8001, help="first worker port on each node")
    p.add_argument("--server-start-timeout", type=int, default=1800)
    p.add_argument("--job-name", default="dwdp-disagg")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", default="01:00:00")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--submit", action="store_true", help="sbatch the script after writing it")
    args = p.parse_args(argv)
    for name in ("dwdp_size", "num_groups", "experts_per_worker", "num_prefetch_experts",
                 "num_gen_servers", "gpus_per_node"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.worker_port + args.gpus_per_node > 65536 or args.router_port in range(
            args.worker_port, args.worker_port + args.gpus_per_node):
        p.error("--router-port must not fall in [--worker-port, --worker-port + gpus-per-node)")
    if args.num_experts is None:
        args.num_experts = _num_experts_from_model(args.model)
    return args


def render_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(description="resolve NODE_<i> in a disaggregated template")
    p.add_argument("--template", required=True)
    p.add_argument("--hosts", nargs="+", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    with open(a.template, encoding="utf-8") as f:
        config = render(yaml.safe_load(f), a.hosts)
    with open(a.out, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "render":
        return render_main(argv[1:])
    args = parse_args(argv)
    try:
        validate(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write_job(args)
    print(json.dumps({"out_dir": os.path.abspath(args.out_dir), **build_layout(args), "files": paths}))
    if args.submit:
        subprocess.run(["sbatch", paths["job.slurm"]], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
