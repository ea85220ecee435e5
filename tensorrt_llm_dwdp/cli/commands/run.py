"""The main job: a DWDP group prefills and decodes, then is checked against one full rank.

With no arguments it builds (once, then reuses) a small synthetic NVFP4 DeepSeek-V3-style
checkpoint, launches 2 DWDP ranks (GPUs when present, else CPU ranks sharing experts through
POSIX shared memory), prefills prompts of unequal lengths, decodes a few tokens, and prints per
rank prefill tokens/s, expert memory against a replicated model, prefetch stall, and a parity
line: the outputs equal those of one rank holding all experts, logits bit for bit.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

NAME = "run"
HELP = "run the main job: DWDP ranks prefill + decode, checked against one full rank"

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model")
    src.add_argument("--model", help="checkpoint folder (HF layout); default: a synthetic one "
                     "built from --preset into the cache folder")
    src.add_argument("--preset", default=None,
                     help="named config for the synthetic checkpoint (default: tiny-deepseek-v3, "
                     "tiny-deepseek-v3-fp8 with --quant fp8; see `make-checkpoint --help`)")
    src.add_argument("--num-layers", type=int, default=4, help="decoder layers of the synthetic "
                     "checkpoint (default: 4)")
    src.add_argument("--dense-layers", type=int, default=None,
                     help="DeepSeek presets: leading dense layers (first_k_dense_replace) of the "
                     "synthetic checkpoint, e.g. 0 so every layer is MoE (default: the preset's)")
    src.add_argument("--quant", default="nvfp4", choices=["nvfp4", "bf16", "fp8"],
                     help="format of the synthetic checkpoint: nvfp4 or bf16 routed experts, or "
                     "fp8 (block 128, every projection linear and expert, as DeepSeek-V3 and "
                     "Qwen3-*-FP8 ship) (default: nvfp4)")
    src.add_argument("--vocab-size", type=int, default=None,
                     help="vocabulary of the synthetic checkpoint (default: the preset's)")
    src.add_argument("--cache-dir", default=None, help="where synthetic checkpoints are kept "
                     "(default: $TRTLLM_DWDP_CACHE or ~/.cache/tensorrt_llm_dwdp)")
    dw = p.add_argument_group("DWDP")
    dw.add_argument("--ranks", type=int, default=2, help="DWDP ranks = dwdp_size (default: 2)")
    dw.add_argument("--dwdp-config", help="YAML with a dwdp_config: section (overrides --ranks, "
                    "--experts-per-worker, --prefetch-experts)")
    dw.add_argument("--experts-per-worker", type=int, default=None,
                    help="W: experts each rank holds (default: E / ranks, a disjoint partition)")
    dw.add_argument("--prefetch-experts", type=int, default=None,
                    help="P: experts fetched from each peer (default: (E - W) / (ranks - 1))")
    dw.add_argument("--contention-opt", action="store_true",
                    help="interleave 2 MiB copy slices across peers in one batched copy")
    dw.add_argument("--expert-view", choices=["multi", "composite"], default=None,
                    help="weights a MoE layer reads: multi (S tensors per parameter) or "
                    "composite (one [E, ...] tensor through virtual-memory mapping) "
                    "(default: the --dwdp-config file's, else composite; --host-offload uvm "
                    "needs multi)")
    tier = p.add_argument_group("host tiers (docs/TIERS.md)")
    tier.add_argument("--host-backup", action="store_true",
                      help="keep one copy of the group's experts in host memory (POSIX shm): "
                      "survivors fail over to it when a rank dies")
    tier.add_argument("--host-experts-per-worker", type=int, default=0, metavar="H",
                      help="leave H of each rank's own experts in host memory, prefetched like "
                      "peer experts (offload; default 0)")
    tier.add_argument("--host-offload", default="prefetch", choices=["prefetch", "uvm"],
                      help="how a rank reads its own host experts: H2D prefetch on the copy "
                      "stream, or in place through CUDA managed memory (GPU only)")
    tier.add_argument("--fail-rank", type=int, default=None, metavar="R",
                      help="failure injection: rank R SIGKILLs itself at its --fail-at-step-th "
                      "step; the others hold their next step until they see it down, fail "
                      "over and finish (forces the TCP launch)")
    tier.add_argument("--fail-at-step", type=int, default=2, metavar="K",
                      help="the step (1-based) at whose start --fail-rank dies (default 2)")
    ex = p.add_argument_group("execution")
    ex.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: one GPU per rank when CUDA is available, else CPU")
    ex.add_argument("--moe-backend", default="torch", help="MoE backend: torch, cutedsl or "
                    "torch-grouped (needs --expert-view composite with DWDP) (default: torch)")
    ex.add_argument("--weight-layout", default="auto", choices=["auto", "linear", "preshuffled"],
                    help="byte order the DWDP ranks keep their NVFP4 experts in: auto (the MoE "
                    "backend's: preshuffled for cutedsl, permuted per expert at load for its "
                    "kernels; linear, as in the checkpoint, for the torch backends), or a layout "
                    "the backend reads (the torch backends unshuffle preshuffled experts). The "
                    "parity reference loads the backend's own layout (default: auto)")
    ex.add_argument("--max-tokens", type=int, default=8, help="tokens generated per prompt")
    ex.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                    help="replay decode steps from CUDA graphs on a GPU, ranks and reference "
                         "alike (default: on; --no-cuda-graphs runs them eagerly)")
    ex.add_argument("--cpu-threads", type=int, default=None, help="torch threads per CPU rank "
                    "(default: cores / ranks; the reference run uses the same count)")
    ex.add_argument("--prompts-file", help="JSON list of prompt strings (default: embedded set)")
    ex.add_argument("--prompt-lengths", type=_lengths, default=None, metavar="L1,L2,...",
                    help="synthetic prompts of exactly these token counts instead of text prompts "
                    "(random ids, a function of the index), e.g. 20000,300")
    ex.add_argument("--max-num-tokens", type=int, default=None, metavar="N",
                    help="tokens per prefill step; a longer prompt is prefilled in chunks of up to N "
                    "tokens, each attending to the KV of the earlier ones (default: every prompt "
                    "of a rank in one step)")
    ex.add_argument("--launcher", default="auto", choices=["auto", "mpirun", "tcp"],
                    help="how ranks start: mpirun if on PATH, else a TCP rendezvous")
    ex.add_argument("--timeout", type=float, default=1800.0, help="seconds before ranks are stopped")
    ex.add_argument("--no-parity", action="store_true", help="skip the single-rank reference run")
    ex.add_argument("--out", default=os.path.join("results", "run"),
                    help="output folder for rank reports, logits and summary.json")


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"token counts must be >= 1, got {text!r}")
    return lengths


def main(args: argparse.Namespace) -> int:
    from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
    from tensorrt_llm_dwdp.launcher import launch, python_module_argv
    from tensorrt_llm_dwdp.model.checkpoint import read_config
    from tensorrt_llm_dwdp.model.tokenizer import load_tokenizer
    from tensorrt_llm_dwdp.moe.backends import backend_weight_layout, expert_weight_layout
    from tensorrt_llm_dwdp.run_job import (DEMO_PROMPTS, assign_prompts, ensure_checkpoint,
                                           format_report, partition_config, read_rank_report,
                                           reference_parity, synthetic_prompts, write_dwdp_yaml)

    started = time.perf_counter()
    try:  # before anything is written or launched: a layout the backend cannot read
        weight_layout = backend_weight_layout(args.moe_backend, args.weight_layout)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    preset = args.preset or ("tiny-deepseek-v3-fp8" if args.quant == "fp8" else "tiny-deepseek-v3")
    model_dir = args.model or ensure_checkpoint(preset, args.num_layers, args.quant,
                                                args.vocab_size, args.cache_dir,
                                                dense_layers=args.dense_layers)
    if args.max_num_tokens is not None and args.max_num_tokens < 1:
        print(f"error: --max-num-tokens must be >= 1, got {args.max_num_tokens}", file=sys.stderr)
        return 1
    model_config, quant = read_config(model_dir)
    num_experts = model_config.num_experts
    if model_config.moe_layer_indices:  # the experts can be in that layout: checked before any
        try:                            # file is written or rank launched (they would all fail)
            weight_layout = expert_weight_layout(args.moe_backend, weight_layout, quant,
                                                 model_config.hidden_size,
                                                 model_config.moe_intermediate_size)
        except ValueError as exc:
            print(f"error: {model_dir}: MoE backend {args.moe_backend}: {exc}", file=sys.stderr)
            return 1
    if args.dwdp_config:
        config = DwdpConfig.from_yaml(args.dwdp_config)
    else:
        config = partition_config(num_experts, args.ranks, args.experts_per_worker,
                                  args.prefetch_experts, contention_opt=args.contention_opt,
                                  host_backup=args.host_backup,
                                  host_experts_per_worker=args.host_experts_per_worker,
                                  host_offload=args.host_offload, expert_view=args.expert_view)
    if args.expert_view is not None:
        config = dataclasses.replace(config, expert_view=args.expert_view)
    config.check_num_experts(num_experts)
    launcher = args.launcher
    if args.fail_rank is not None:
        launcher = _check_failure_injection(args, config)
    if config.tiers_enabled:
        _check_host_store_fits(model_dir, config)
    os.makedirs(args.out, exist_ok=True)
    config_path = os.path.join(args.out, "dwdp.yaml")
    write_dwdp_yaml(config, config_path)

    if args.prompt_lengths:
        token_ids = synthetic_prompts(args.prompt_lengths, model_config.vocab_size)
    else:
        texts = DEMO_PROMPTS
        if args.prompts_file:
            with open(args.prompts_file) as f:
                texts = tuple(json.load(f))
        tokenizer = load_tokenizer(model_dir)
        token_ids = [tokenizer.encode(t) for t in texts]
    groups = [[token_ids[i] for i in idx] for idx in assign_prompts(len(token_ids), config.dwdp_size)]
    prompts_path = os.path.join(args.out, "prompts.json")
    with open(prompts_path, "w") as f:
        json.dump(groups, f)

    threads = args.cpu_threads or max(1, (os.cpu_count() or 1) // config.dwdp_size)
    print(f"model {model_dir}: {num_experts} experts; DWDP {config.dwdp_size} ranks, "
          f"W={config.experts_per_worker(num_experts)} P={config.prefetch_experts()}, "
          f"{config.expert_view} view, {weight_layout} expert weights; prompts of {[len(p) for p in token_ids]} tokens, prefill "
          + (f"in chunks of <= {args.max_num_tokens} tokens" if args.max_num_tokens else "unchunked"),
          flush=True)
    argv = python_module_argv("--log-level", args.log_level, "rank-worker", "--model", model_dir,
                              "--dwdp-config", config_path, "--prompts", prompts_path,
                              "--max-tokens", str(args.max_tokens), "--device", args.device,
                              "--moe-backend", args.moe_backend, "--out", args.out,
                              "--weight-layout", weight_layout,
                              "--cpu-threads", str(threads),
                              "--cuda-graphs" if args.cuda_graphs else "--no-cuda-graphs",
                              *(("--max-num-tokens", str(args.max_num_tokens)) if args.max_num_tokens else ()))
    killed: tuple[int, ...] = ()
    if args.fail_rank is not None:
        argv += ["--fail-rank", str(args.fail_rank), "--fail-at-step", str(args.fail_at_step)]
        killed = (args.fail_rank,)
    result = launch(config.dwdp_size, argv, launcher=launcher, timeout_s=args.timeout,
                    survivors=bool(killed), expect_killed=killed, num_groups=config.num_groups)
    for r in killed:
        print(f"rank {r}: killed at its step {args.fail_at_step} (--fail-rank), exit code "
              f"{result.returncodes[r]}", flush=True)
    if not result.ok:
        print(f"error: DWDP ranks failed (launcher {result.launcher}, exit codes "
              f"{list(result.returncodes)}); see the log above", file=sys.stderr)
        return 1
    reports = [read_rank_report(os.path.join(args.out, f"rank{r}.json"))
               for r in range(config.dwdp_size) if r not in killed]
    parity = None
    if not args.no_parity:
        parity = reference_parity(model_dir, args.out, groups, max_tokens=args.max_tokens,
                                  device=args.device, moe_backend=args.moe_backend,
                                  cpu_threads=threads, max_num_tokens=args.max_num_tokens,
                                  skip=frozenset(killed), cuda_graphs=args.cuda_graphs)
    print(format_report(reports, parity))
    summary = {"model": model_dir, "dwdp_config": config.to_dict(), "launcher": result.launcher,
               "moe_backend": args.moe_backend, "weight_layout": weight_layout,
               "cuda_graphs": args.cuda_graphs,
               "prompt_lengths": [len(p) for p in token_ids], "max_num_tokens": args.max_num_tokens,
               "killed": list(killed), "shm_cleaned": list(result.cleaned),
               "wall_seconds": time.perf_counter() - started,
               "ranks": [r.__dict__ | {"prefill_tokens_per_s": r.prefill_tokens_per_s} for r in reports],
               "parity": None if parity is None else parity.__dict__}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if parity is not None and not (parity.tokens_equal and parity.logits_bitwise_equal):
        return 2
    return 0


def _check_failure_injection(args: argparse.Namespace, config) -> str:
    """Validate --fail-rank / --fail-at-step; the launcher that lets survivors live (TCP)."""
    if not 0 <= args.fail_rank < config.dwdp_size or config.dwdp_size < 2:
        raise SystemExit(f"error: --fail-rank {args.fail_rank} must name a rank of a group of "
                         f">= 2 ranks, [0, {config.dwdp_size})")
    if not 1 <= args.fail_at_step < args.max_tokens:
        raise SystemExit(f"error: --fail-at-step {args.fail_at_step} must be in [1, "
                         f"--max-tokens = {args.max_tokens}) so the survivors have a step left")
    if args.launcher == "mpirun":
        raise SystemExit("error: --fail-rank needs the TCP launch (plain mpirun aborts the job "
                         "when a rank dies; see docs/TIERS.md); use --launcher tcp or auto")
    return "tcp"


def _check_host_store_fits(model_dir: str, config) -> None:
    """Before anything starts: the host store must fit in /dev/shm and RAM (named numbers)."""
    from tensorrt_llm_dwdp.dwdp.host_store import check_checkpoint_store

    try:
        check_checkpoint_store(model_dir, config.num_groups)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
