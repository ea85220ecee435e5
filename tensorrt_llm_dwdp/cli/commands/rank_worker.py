"""One rank of the ``run`` job (started by ``run`` under mpirun or the TCP rendezvous).

Loads its expert slice, exchanges handles with its peers, prefills and decodes its own prompts,
and writes ``rank{r}.json`` (measurements) and ``rank{r}.pt`` (tokens and per-step logits).
"""
from __future__ import annotations

import argparse
import json
import logging

NAME = "rank-worker"
HELP = "one DWDP rank of the `run` job (internal: `run` starts it on every rank)"

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (HF layout)")
    p.add_argument("--dwdp-config", required=True, help="YAML with a dwdp_config: section")
    p.add_argument("--prompts", required=True, help="JSON: per rank a list of token-id lists")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens to generate per prompt")
    p.add_argument("--max-num-tokens", type=int, default=None,
                   help="tokens per prefill step (longer prompts are chunked); default: all prompts at once")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--moe-backend", default="torch", help="MoE backend name (torch, cutedsl, torch-grouped)")
    p.add_argument("--weight-layout", default="auto", choices=["auto", "linear", "preshuffled"],
                   help="byte order of the routed experts in memory (moe/layouts.py); auto: the "
                   "MoE backend's")
    p.add_argument("--out", required=True, help="folder for rank{r}.json / rank{r}.pt")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="decode steps from CUDA graphs on a GPU (default: on)")
    p.add_argument("--cpu-threads", type=int, default=1, help="torch threads when on the CPU")
    p.add_argument("--fail-rank", type=int, default=None,
                   help="failure injection: this rank SIGKILLs itself at --fail-at-step")
    p.add_argument("--fail-at-step", type=int, default=2,
                   help="step (1-based) at whose start --fail-rank dies; the others hold the "
                   "next step until they see it down")


def main(args: argparse.Namespace) -> int:
    import torch

    from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
    from tensorrt_llm_dwdp.dwdp.manager import DwdpManager
    from tensorrt_llm_dwdp.model.checkpoint import load_model
    from tensorrt_llm_dwdp.model.config import ModelConfig
    from tensorrt_llm_dwdp.run_job import (generate_with_logits, local_rank_from_env, pick_device,
                                           rank_report, write_rank_outputs)

    config = DwdpConfig.from_yaml(args.dwdp_config)
    num_experts = ModelConfig.from_file(args.model).num_experts
    device = pick_device(args.device, local_rank_from_env())
    if device.type == "cpu":
        torch.set_num_threads(args.cpu_threads)
    with open(args.prompts) as f:
        prompt_groups = json.load(f)
    with DwdpManager.from_environment(config, num_experts, device) as manager:
        rank = manager.rank
        if len(prompt_groups) != config.dwdp_size:
            raise ValueError(f"{args.prompts}: {len(prompt_groups)} prompt groups for "
                             f"dwdp_size={config.dwdp_size}")
        model = load_model(args.model, device=device, moe_backend=args.moe_backend, dwdp=manager,
                           weight_layout=args.weight_layout)
        manager.exchange()
        prompts = prompt_groups[rank]
        outputs, logits, stats = [], [], None
        if prompts:
            outputs, logits, stats = generate_with_logits(
                model, prompts, max_tokens=args.max_tokens, device=device, dwdp=manager,
                progress_desc=f"rank {rank} decode" if rank == 0 else None,
                max_num_tokens=args.max_num_tokens, cuda_graphs=args.cuda_graphs,
                before_step=_failure_injection(args, manager))
        for event in manager.tier_events:
            print(event.message, flush=True)
        report = rank_report(rank, device, prompts, outputs, stats, manager, model)
        write_rank_outputs(args.out, f"rank{rank}", report, outputs, logits)
        logger.info("rank %d: %d prompts, %d prefill tokens in %.3f s", rank, len(prompts),
                    report.prefill_tokens, report.prefill_seconds)
    return 0


def _failure_injection(args: argparse.Namespace, manager):
    """``before_step`` of the generation loop for ``--fail-rank``: that rank kills itself at
    the start of step K; the others, before step K + 1, wait until they see it down (so the
    failover happens mid-run however the OS schedules the ranks)."""
    import os
    import signal
    import time

    if args.fail_rank is None:
        return None
    victim, k = args.fail_rank, args.fail_at_step

    def before_step(step: int) -> None:
        if manager.rank == victim and step == k:
            print(f"rank {victim}: SIGKILL at the start of step {k} (--fail-rank)", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if manager.rank != victim and step == k + 1:
            deadline = time.monotonic() + manager.config.peer_timeout_s
            while manager.peer_down(victim) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rank {victim} was to die at its step {k} but is still "
                                       f"up after {manager.config.peer_timeout_s:g} s")
                time.sleep(0.01)

    return before_step
