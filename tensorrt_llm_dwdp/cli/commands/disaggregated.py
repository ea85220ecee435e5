"""``tensorrt_llm_dwdp disaggregated -c disagg.yaml``: the router of a disaggregated deployment,
as ``trtllm-serve disaggregated``. It waits for every listed server's /health, then routes each
request to a context server (prefill) and a generation server (decode)."""
from __future__ import annotations

import argparse
import sys

NAME = "disaggregated"
HELP = "Run the disaggregated router (context servers for prefill, generation servers for decode)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tensorrt_llm_dwdp.serve.options import LOG_LEVELS

    p.add_argument("-c", "--config_file", required=True, help="disaggregated YAML (hostname, port, "
                   "context_servers, generation_servers)")
    p.add_argument("-t", "--server_start_timeout", type=int, default=180,
                   help="seconds to wait for every server's /health (default: 180)")
    p.add_argument("-r", "--request_timeout", type=int, default=180,
                   help="seconds one request may take on a worker (default: 180)")
    p.add_argument("-l", "--log_level", dest="serve_log_level", default=None, choices=sorted(LOG_LEVELS))


def load_config(args: argparse.Namespace):
    """Set the log level and read ``--config_file``; None (error printed) when it is invalid.

    Shared with ``disaggregated_mpi_worker``, which reads the same YAML."""
    from tensorrt_llm_dwdp.cli.commands.serve import configure_logging
    from tensorrt_llm_dwdp.serve.disagg_config import load_disagg_config
    from tensorrt_llm_dwdp.serve.options import OptionsError

    configure_logging(args.serve_log_level)
    try:
        return load_disagg_config(args.config_file)
    except OptionsError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def main(args: argparse.Namespace) -> int:
    from tensorrt_llm_dwdp.serve.launch import bind_listener, serve_app
    from tensorrt_llm_dwdp.serve.router import DisaggRouter

    config = load_config(args)
    if config is None:
        return 2
    sock = bind_listener(config.hostname, config.port)
    router = DisaggRouter(config, request_timeout_s=args.request_timeout,
                          server_start_timeout_s=args.server_start_timeout)
    serve_app(router.make_app(), config.hostname, config.port, sock=sock)
    return 0
