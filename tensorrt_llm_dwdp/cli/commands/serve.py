"""``tensorrt_llm_dwdp serve MODEL``: an OpenAI-compatible server, with the flags of ``trtllm-serve serve``.

The ``--extra_llm_api_options`` YAML overrides the flags (as upstream) and may carry a
``dwdp_config:`` section; a DWDP worker started this way finds its group through mpirun or the
TCP rendezvous variables (TRTLLM_DWDP_RANK / _MASTER_ADDR / _MASTER_PORT).
"""
from __future__ import annotations

import argparse
import logging
import sys

NAME = "serve"
HELP = "Serve a model over an OpenAI-compatible HTTP API (trtllm-serve serve flags)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tensorrt_llm_dwdp.serve import options as o

    p.add_argument("model", help="checkpoint folder (HF layout: config.json, safetensors, tokenizer)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    p.add_argument("--host", default="localhost", help="address to bind (default: localhost)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--backend", default="pytorch", help="only 'pytorch' (this project's engine)")
    p.add_argument("--log_level", dest="serve_log_level", default=None, choices=sorted(o.LOG_LEVELS),
                   help="logging level (trtllm-serve names; default: info)")
    p.add_argument("--max_batch_size", type=int, default=o.DEFAULT_MAX_BATCH_SIZE,
                   help=f"sequences in flight, KV slots preallocated (default: {o.DEFAULT_MAX_BATCH_SIZE})")
    p.add_argument("--max_num_tokens", type=int, default=o.DEFAULT_MAX_NUM_TOKENS,
                   help=f"prefill tokens per step (default: {o.DEFAULT_MAX_NUM_TOKENS})")
    p.add_argument("--max_seq_len", type=int, default=o.DEFAULT_MAX_SEQ_LEN,
                   help=f"prompt + output tokens per request (default: {o.DEFAULT_MAX_SEQ_LEN})")
    for long, short in (("tensor_parallel_size", "tp_size"), ("pipeline_parallel_size", "pp_size"),
                        ("context_parallel_size", "cp_size"), ("moe_expert_parallel_size", "ep_size")):
        p.add_argument(f"--{long}", f"--{short}", dest=short, type=int, default=None,
                       help="accepted for compatibility; only 1 is supported")
    p.add_argument("--extra_llm_api_options", "--config", dest="extra_llm_api_options", default=None,
                   help="LLM-API YAML overriding these flags (may hold dwdp_config:)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: CUDA when present, one GPU per local rank)")
    p.add_argument("--no_cuda_graphs", dest="cuda_graphs", action="store_false",
                   help="run decode steps eagerly (default: replayed from CUDA graphs on a GPU; "
                        "the YAML's cuda_graph_config: null does the same)")


def configure_logging(level: str | None) -> None:
    from tensorrt_llm_dwdp.serve.options import LOG_LEVELS

    if level is not None:
        logging.getLogger().setLevel(LOG_LEVELS[level])


def main(args: argparse.Namespace) -> int:
    from tensorrt_llm_dwdp.run_job import local_rank_from_env
    from tensorrt_llm_dwdp.serve.options import OptionsError, options_from_cli
    from tensorrt_llm_dwdp.serve.worker import run_worker_server

    configure_logging(args.serve_log_level)
    try:
        options = options_from_cli(args)
    except OptionsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_worker_server(options, local_rank=local_rank_from_env())
    return 0
